"""The canonical quantized checkpoint: integer codes + fp16 step per row (or per group) + grid. Every exporter reads
only this.

On disk it is a transformers-style directory:

    config.json          the model's config plus ``quantization_config`` (quant_method "paretoq", per-module grid)
    model.safetensors    ``<module>.qweight`` uint8 bit-packed codes [out, ceil(in * code_bits / 8)]
                         ``<module>.scales``  fp16 step s per row [out], or per group of G consecutive columns
                                              [out, in // G] (``group_size`` G in quantization_config)
                         every unquantized tensor (embeddings, norms, biases, lm_head) in ``float_dtype``
    tokenizer files      as the tokenizer's save_pretrained writes them

A quantized weight is ``w[r, c] = scales[r, c // G] * (code[r, c] - zero)`` with the grid's zero (DESIGN.md section 2),
evaluated in float32, where it is exact. Directories are written to a temporary sibling and renamed into place,
and config.json records the sha256 of the weights, so a half-written or corrupted checkpoint never loads.

The checkpoint is made from models by qat.checkpoint_io (trained QAT models, float models, ParetoQ reference
checkpoints, on-grid weights): the producers sit with the code that makes their input, this module only holds,
reads and writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from paretoq_export.canonical.atomic import atomic_dir
from paretoq_export.canonical.grids import GRIDS, Grid, dequantize_codes, group_size_of
from paretoq_export.canonical.packing import pack_codes, packed_row_bytes, unpack_codes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
QUANT_METHOD = "paretoq"
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message is one line naming the problem and the fix."""


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [out, in], values < grid.n_codes
    scale: torch.Tensor  # float16 [out]: the step s per row; or [out, in // G]: per group of G consecutive columns
    grid: Grid

    def __post_init__(self) -> None:
        # one spelling per layout: a single group per row is the per-row step [out]
        if self.scale.dim() == 2 and self.scale.shape[1] == 1:
            self.scale = self.scale.reshape(-1)
        rows, cols = self.codes.shape
        n_groups = 1 if self.scale.dim() == 1 else self.scale.shape[1]
        if self.scale.shape[0] != rows or cols % n_groups:
            raise CheckpointError(
                f"steps of shape {tuple(self.scale.shape)} do not fit codes {rows}x{cols}: "
                "give one step per row [out] or per group [out, in // G]"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        """Consecutive columns sharing one step: the row length (``in``) for per-row steps, else G."""
        return group_size_of(self.shape, tuple(self.scale.shape))

    @property
    def per_row(self) -> bool:
        return self.scale.dim() == 1

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.grid)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


HASH_KEYS = ("weights_sha256", "config_sha256")


def config_sha256(config: dict) -> str:
    """sha256 of config.json's content (quantization_config included, its hash fields excluded), as JSON with
    sorted keys: an edited hidden_size or rms_norm_eps is as corrupt as a flipped weight byte."""
    qconfig = {k: v for k, v in config.get("quantization_config", {}).items() if k not in HASH_KEYS}
    canonical = json.dumps(dict(config, quantization_config=qconfig), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _verify_integrity(path: Path, config: dict, weights: Path) -> None:
    qconfig = config["quantization_config"]
    if not all(isinstance(qconfig.get(k), str) for k in HASH_KEYS):
        raise CheckpointError(f"{path} has no integrity data (quantization_config lacks {' / '.join(HASH_KEYS)}): "
                              "re-create the checkpoint, or pass --no-verify to load it unchecked")
    if qconfig["config_sha256"] != config_sha256(config):
        raise CheckpointError(f"{path / CONFIG_FILE} was edited or is corrupt (sha256 differs from the one recorded "
                              "at save): re-create the checkpoint, or pass --no-verify to load it unchecked")
    if qconfig["weights_sha256"] != _sha256(weights):
        raise CheckpointError(f"{weights} is corrupt (sha256 differs from config.json): re-create the checkpoint")


def checkpoint_keeps(name: str) -> bool:
    """Whether a file beside the weights belongs in a checkpoint (and in what is exported from it): tokenizer and
    generation files, never code (a ``tokenization_*.py`` would run in whoever loads the folder) or hidden files."""
    return not name.startswith(".") and not name.endswith((".py", ".pyc")) and name not in (CONFIG_FILE, WEIGHTS_FILE)


def saved_tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name (what a checkpoint keeps beside its weights)."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file() and checkpoint_keeps(p.name)}


def to_float_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor in the checkpoint's float dtype (integer tensors unchanged); overflow is an error."""
    if not tensor.is_floating_point():
        return tensor.contiguous()
    out = tensor.detach().to(dtype)
    if not torch.isfinite(out).all():
        raise CheckpointError(f"tensor {name} overflows {dtype}: save with float_dtype='float32' (--float-dtype)")
    return out.contiguous()


@dataclass
class QuantizedCheckpoint:
    config: dict  # the transformers config as a dict, without quantization_config
    quantized: dict[str, QuantizedTensor]  # parameter name ("...q_proj.weight") -> codes + steps
    tensors: dict[str, torch.Tensor]  # every other tensor of the state dict
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def bits_per_module(self) -> dict[str, float]:
        return {k[: -len(".weight")]: q.grid.bits for k, q in self.quantized.items()}

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in float32 (quantized ones as s * (q - z)); tied lm_head not repeated."""
        out = {k: (v.float() if v.is_floating_point() else v) for k, v in self.tensors.items()}
        out.update({k: q.dequantize() for k, q in self.quantized.items()})
        return out

    def build_reference_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A plain transformers model holding exactly the dequantized weights: the reference for every check."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**self.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        state = self.dequantized_state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        allowed_missing = {"lm_head.weight"} if self.tied else set()
        if set(missing) - allowed_missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match {config.architectures}: missing {sorted(set(missing) - allowed_missing)[:3]}"
                f", unexpected {sorted(unexpected)[:3]}"
            )
        if self.tied:
            model.tie_weights()
        # non-persistent buffers (rotary inv_freq) were left on meta: materialise them from the config
        for module_name, module in model.named_modules():
            for buf_name, buf in list(module.named_buffers(recurse=False)):
                if buf.is_meta:
                    _rebuild_buffer(model, module_name, module, buf_name)
        return model.to(dtype).eval()

    # ------------------------------------------------------------------ disk
    def quantization_config(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "modules": {
                k[: -len(".weight")]: {"grid": q.grid.name, "bits": q.grid.bits, "shape": list(q.shape),
                                       "group_size": q.group_size}
                for k, q in self.quantized.items()
            },
            "grids": {name: GRIDS[name].to_json() for name in sorted({q.grid.name for q in self.quantized.values()})},
            "layout": "qweight: per-row LSB-first packed codes; w = scales[row, col // group_size] * (code - zero), "
                      "float32 (scales [out] when group_size is the row length)",
            "recipe": self.recipe,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write atomically: a temporary sibling directory, renamed into place when complete."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise CheckpointError(f"output {path} exists and is not empty: pass --overwrite or choose another -o")
        with atomic_dir(path) as tmp:
            tensors: dict[str, torch.Tensor] = dict(self.tensors)
            for key, q in self.quantized.items():
                base = key[: -len(".weight")]
                packed = pack_codes(q.codes.numpy(), q.grid.code_bits)
                tensors[f"{base}.qweight"] = torch.from_numpy(packed)
                tensors[f"{base}.scales"] = q.scale.to(torch.float16).contiguous()
            # one metadata key: safetensors writes its metadata map in a random order (a Rust HashMap), and two
            # identical checkpoints must be identical files (quant_method is in config.json)
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            for name, data in self.tokenizer_files.items():
                if checkpoint_keeps(name):
                    (tmp / name).write_bytes(data)
            qconfig = self.quantization_config()
            qconfig["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
            # hashed as it reads back (default=str turns odd values into strings)
            config = json.loads(json.dumps(dict(self.config, quantization_config=qconfig), default=str))
            config["quantization_config"]["config_sha256"] = config_sha256(config)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            # config vs tensors before it takes its final name (a full read-back would double the memory of a
            # large model; the hashes written above guard every later read)
            self.check_config_matches_tensors(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "QuantizedCheckpoint":
        """Read a checkpoint; every way it can be damaged is one CheckpointError line. ``verify``: refuse it unless
        config.json and the weights match the sha256 recorded at save (``--no-verify`` turns that off)."""
        path = Path(path)
        try:
            ckpt = cls._read(path, verify)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a malformed config.json
            raise CheckpointError(f"{path / CONFIG_FILE} is malformed ({type(exc).__name__}: {exc}): re-create the "
                                  "checkpoint") from exc
        ckpt.check_config_matches_tensors(path)
        return ckpt

    def check_config_matches_tensors(self, where: str | os.PathLike = "the checkpoint") -> None:
        """Every tensor has the shape the config's model expects (a model built on the meta device, no memory):
        an edited hidden_size fails here, in one line, before anything is written."""
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.for_model(**self.config)
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: config.json does not describe a model transformers can build ({exc}): "
                                  "re-create the checkpoint") from exc
        held = {k: tuple(t.shape) for k, t in self.tensors.items()}
        held.update({k: q.shape for k, q in self.quantized.items()})
        for name, shape in held.items():
            if name in expected and expected[name] != shape:
                raise CheckpointError(f"{where}: tensor {name} is {list(shape)} but config.json describes "
                                      f"{list(expected[name])}: config and weights disagree, re-create the checkpoint")

    @classmethod
    def _read(cls, path: Path, verify: bool) -> "QuantizedCheckpoint":
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{path} is not a paretoq checkpoint (no {CONFIG_FILE}): make one with `paretoq-export quantize` "
                "or `paretoq-export qat`"
            )
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path / CONFIG_FILE} is corrupt ({exc}): re-create the checkpoint") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / CONFIG_FILE} holds a {type(config).__name__}, not a config object: "
                                  "re-create the checkpoint")
        qconfig = config.get("quantization_config")
        if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"{path} has no paretoq quantization_config: it is a float model, quantize it first")
        if not isinstance(qconfig.get("format_version", 0), int) or qconfig.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} uses checkpoint format {qconfig['format_version']}: upgrade paretoq-export")
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing: the checkpoint is half-written, re-create it")
        if verify:
            _verify_integrity(path, config, weights)
        config.pop("quantization_config")
        if not isinstance(qconfig.get("modules"), dict):
            raise CheckpointError(f"{path / CONFIG_FILE}: quantization_config lacks its modules table: re-create the "
                                  "checkpoint")
        unknown = sorted({str(i.get("grid")) for i in qconfig["modules"].values() if i.get("grid") not in GRIDS})
        if unknown:
            raise CheckpointError(f"{path / CONFIG_FILE} names unknown grid(s) {', '.join(unknown)} (known: "
                                  f"{', '.join(GRIDS)}): re-create the checkpoint or upgrade paretoq-export")
        try:
            raw = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weights} is corrupt ({exc}): re-create the checkpoint") from exc
        quantized = {}
        for base, info in qconfig["modules"].items():
            grid = GRIDS[info["grid"]]
            rows, cols = info["shape"]
            group_size = int(info.get("group_size") or cols)  # absent in checkpoints written before groups: per row
            if group_size <= 0 or cols % group_size:
                raise CheckpointError(f"{base}: group size {group_size} does not divide {cols} columns: corrupt")
            scale_shape = (rows,) if group_size == cols else (rows, cols // group_size)
            try:
                packed, scale = raw.pop(f"{base}.qweight"), raw.pop(f"{base}.scales")
            except KeyError as exc:
                raise CheckpointError(f"{weights} lacks {exc.args[0]}: the checkpoint is corrupt, re-create it") from None
            if tuple(packed.shape) != (rows, packed_row_bytes(cols, grid.code_bits)) or tuple(scale.shape) != scale_shape:
                raise CheckpointError(
                    f"{base}: packed shape {tuple(packed.shape)} / steps {tuple(scale.shape)} do not match {rows}x{cols}"
                    f" with group size {group_size}: corrupt"
                )
            codes = unpack_codes(packed.numpy(), grid.code_bits, cols)
            if grid.n_codes < 2**grid.code_bits and codes.max(initial=0) >= grid.n_codes:
                raise CheckpointError(f"{base}: code {codes.max()} is outside the {grid.name} grid: corrupt checkpoint")
            quantized[f"{base}.weight"] = QuantizedTensor(torch.from_numpy(codes), scale.to(torch.float16), grid)
        tokenizer_files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and checkpoint_keeps(p.name)}
        return cls(config, quantized, raw, tokenizer_files, qconfig.get("recipe", {}))

    def load_tokenizer(self):
        """The tokenizer saved with the checkpoint (transformers AutoTokenizer), or None."""
        if not self.tokenizer_files:
            return None
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in self.tokenizer_files.items():
                (Path(tmp) / name).write_bytes(data)
            try:  # never the tokenizer's own code (checkpoints keep none; an auto_map alone must not prompt)
                return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
            except (ValueError, OSError, KeyError, TypeError) as exc:
                needs_code = "custom code" in str(exc)
                reason = ("they name their own code (auto_map), which never runs from a checkpoint" if needs_code
                          else " ".join(str(exc).split())[:200])
                raise CheckpointError(f"the checkpoint's tokenizer files do not load ({reason}): re-create the "
                                      "checkpoint from a model with a standard tokenizer") from exc

    def nbytes(self) -> dict[str, int]:
        """Packed code bytes, step bytes and float-tensor bytes (what the file holds, headers aside)."""
        codes = sum(q.shape[0] * packed_row_bytes(q.shape[1], q.grid.code_bits) for q in self.quantized.values())
        steps = sum(q.scale.numel() * 2 for q in self.quantized.values())
        floats = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return {"codes": codes, "steps": steps, "float": floats, "total": codes + steps + floats}


def _rebuild_buffer(model: nn.Module, module_name: str, module: nn.Module, buf_name: str) -> None:
    # Rotary embeddings compute inv_freq from the config in __init__; re-run that on CPU.
    if hasattr(module, "rope_init_fn") or "rotary" in type(module).__name__.lower():
        fresh = type(module)(config=model.config)
        for name, buf in fresh.named_buffers(recurse=False):
            module.register_buffer(name, buf, persistent=False)
        for attr in ("attention_scaling", "original_inv_freq"):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))
        return
    if buf_name == "embed_scale" and hasattr(module, "scalar_embed_scale"):  # Gemma's sqrt(hidden) embedding factor
        module.register_buffer(buf_name, torch.tensor(module.scalar_embed_scale), persistent=False)
        return
    raise CheckpointError(f"cannot rebuild buffer {module_name}.{buf_name} of {type(module).__name__}")


def open_checkpoint(checkpoint: "QuantizedCheckpoint | str | os.PathLike") -> tuple[QuantizedCheckpoint, Path | None]:
    """What every exporter takes: a QuantizedCheckpoint, or its directory (loaded here); and that directory, where
    default output names are placed (None for an in-memory checkpoint)."""
    if isinstance(checkpoint, QuantizedCheckpoint):
        return checkpoint, None
    return QuantizedCheckpoint.load(checkpoint), Path(checkpoint)
