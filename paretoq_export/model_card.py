"""`paretoq-export card OUTPUT_DIR`: the Hugging Face Hub model card (README.md) of an export folder.

Everything on the card is read from the folder, never assumed:

- the recipe from the canonical checkpoint's config.json (``quantization_config.recipe`` and ``.modules``), or,
  without a checkpoint, from the ``paretoq.recipe`` metadata the GGUF / ONNX writers embed;
- one row per exported file: GGUF tensor types and sizes through ``gguf.GGUFReader``, ONNX MatMulNBits containers
  and initializer sizes through ``onnx`` (graph only, external data untouched), ExecuTorch .pte sizes and the
  target recorded in its name;
- accuracy from the validation reports (``validate*.json`` and the exporters' ``*.validation.json``, one schema:
  formats.validation) and speed from ``bench*.json`` files (``paretoq-export bench``); a ``pareto.md`` is linked.

A section whose data is missing is left out. The front matter is built with huggingface_hub's ModelCardData
(base_model, base_model_relation: quantized, library_name, tags, license, pipeline_tag) and the file is written
atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from formats.protocol import ArtifactSummary, count_text
from formats.registry import FORMATS
from formats.validation import REPORT_SUFFIX
from paretoq_export.canonical.atomic import write_text_atomic

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
CHECKPOINT_CONFIG = "config.json"
PARETO_PAGE = "pareto.md"
EXAMPLE_PROMPT = "The capital of France is"
# Hub repo ids: "org/name" (base_model must name a Hub model, or the Hub rejects the card's metadata)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Leftovers of interrupted writes and training state: never described (the writers use these names)
_SKIPPED_NAME = re.compile(r"(\.partial-|\.old-\d+|\.tmp$|\.train$|^__pycache__$)")
_BIT_TAGS = {1.0: ("1-bit", "binary"), 1.58: ("1.58-bit", "ternary"), 2.0: ("2-bit",), 3.0: ("3-bit",),
             4.0: ("4-bit",), 8.0: ("8-bit",)}
_FORMAT_LIBRARY = {f.title: f.library for f in FORMATS.values()}  # library_name, in preference order
_FORMAT_ORDER = [*_FORMAT_LIBRARY, "checkpoint"]
_METHODS = {
    "qat": "ParetoQ quantization-aware training",
    "rtn": "round-to-nearest on the ParetoQ grids (no training)",
    "float": "unquantized (float baseline)",
}


class ModelCardError(ValueError):
    """A card that cannot be written; the message is one line naming the problem and the fix."""


# ----------------------------------------------------------------------------------------------- what is in the folder
@dataclass
class CheckpointSummary:
    path: Path
    config: dict  # config.json without quantization_config
    quantization: dict  # quantization_config
    n_params: int | None  # every weight of the model (tied tables once), from the safetensors header

    @property
    def recipe(self) -> dict:
        return self.quantization.get("recipe") or {}

    def module_bits(self) -> dict[str, float]:
        return {name: float(info["bits"]) for name, info in (self.quantization.get("modules") or {}).items()}


def _skipped(name: str) -> bool:
    return name.startswith(".") or bool(_SKIPPED_NAME.search(name))


def _walk(root: Path) -> Iterable[tuple[Path, list[str], list[str]]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        yield Path(dirpath), dirnames, sorted(f for f in filenames if not _skipped(f))


def find_checkpoint(output_dir: Path) -> Path | None:
    """The first directory under ``output_dir`` (itself included) holding a paretoq checkpoint config.json."""
    found = [dirpath for dirpath, _, filenames in _walk(output_dir)
             if CHECKPOINT_CONFIG in filenames and _is_paretoq_config(dirpath / CHECKPOINT_CONFIG)]
    if len(found) > 1:
        log.warning("%d checkpoints in %s: the recipe is read from %s (pass --checkpoint to choose)",
                    len(found), output_dir, found[0])
    return found[0] if found else None


def _is_paretoq_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "paretoq"


def read_checkpoint(path: Path) -> CheckpointSummary:
    """config.json and the parameter count (safetensors header only: the weights are not loaded)."""
    from paretoq_export.canonical.checkpoint import WEIGHTS_FILE

    config_file = path / CHECKPOINT_CONFIG
    if not config_file.is_file() or not _is_paretoq_config(config_file):
        raise ModelCardError(f"{path} is not a paretoq checkpoint (no config.json with a paretoq quantization_config):"
                             " pass the directory written by `paretoq-export quantize/qat` as --checkpoint")
    config = json.loads(config_file.read_text())
    quantization = config.pop("quantization_config")
    return CheckpointSummary(path, config, quantization, _checkpoint_params(path / WEIGHTS_FILE, quantization))


def _checkpoint_params(weights: Path, quantization: dict) -> int | None:
    if not weights.is_file():
        return None
    from safetensors import safe_open

    modules = quantization.get("modules") or {}
    total = sum(math.prod(info["shape"]) for info in modules.values())
    with safe_open(str(weights), "np") as fh:
        for key in fh.keys():
            base = key.rsplit(".", 1)[0]
            if base in modules and key.endswith((".qweight", ".scales")):
                continue  # counted from the module's logical shape above
            total += math.prod(fh.get_slice(key).get_shape())
    return total


def describe_checkpoint(ckpt: CheckpointSummary, root: Path) -> ArtifactSummary:
    """The canonical checkpoint as a file of the repo: packed codes + fp16 steps, sizes from the safetensors header."""
    from safetensors import safe_open

    from paretoq_export.canonical.checkpoint import WEIGHTS_FILE

    modules = ckpt.quantization.get("modules") or {}
    weights = ckpt.path / WEIGHTS_FILE
    lin_bytes = total_bytes = 0
    with safe_open(str(weights), "np") as fh:
        for key in fh.keys():
            sl = fh.get_slice(key)
            nbytes = math.prod(sl.get_shape()) * _SAFETENSORS_ITEMSIZE.get(sl.get_dtype(), 4)
            total_bytes += nbytes
            if key.rsplit(".", 1)[0] in modules and key.endswith((".qweight", ".scales")):
                lin_bytes += nbytes
    lin_elems = sum(math.prod(info["shape"]) for info in modules.values())
    grids = Counter(info["grid"] for info in modules.values())
    return ArtifactSummary(
        path=ckpt.path.resolve().relative_to(root.resolve()), format="checkpoint", size_bytes=sum(
            p.stat().st_size for p in ckpt.path.iterdir() if p.is_file()),
        containers="packed codes + fp16 row steps: " + count_text(grids),
        linear_bpw=8 * lin_bytes / lin_elems if lin_elems else None,
        total_bpw=8 * total_bytes / ckpt.n_params if ckpt.n_params else None,
        bits=sorted(set(ckpt.module_bits().values())), folder=True,
    )


_SAFETENSORS_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8,
                         "I64": 8}


def find_artifacts(output_dir: Path, n_params: int | None = None) -> list[ArtifactSummary]:
    """Every exported file or folder below ``output_dir``, described by its format (formats.registry order)."""
    found: list[ArtifactSummary] = []
    for dirpath, _, filenames in _walk(output_dir):
        for fmt in FORMATS.values():
            found += [fmt.describe(path, output_dir, n_params) for path in fmt.artifacts_in(dirpath, filenames)]
    return sorted(found, key=lambda a: (_FORMAT_ORDER.index(a.format), str(a.path)))


def _read_json(path: Path, remedy: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{path} is not valid JSON ({exc}): {remedy} or remove it") from None
    if not isinstance(data, dict):
        raise ModelCardError(f"{path} does not hold a JSON object: {remedy} or remove it")
    return data


def _read_json_files(output_dir: Path, prefix: str) -> list[tuple[Path, dict]]:
    remedy = f"re-run `paretoq-export {prefix.rstrip('_')}`"
    return [(path, _read_json(path, remedy)) for path in sorted(output_dir.glob(f"{prefix}*.json"))]


def _validation_reports(output_dir: Path) -> list[tuple[Path, dict]]:
    """Every validation report in the folder, all in formats.validation's schema: ``validate*.json`` from
    `paretoq-export validate`, then the exporters' own (``<file>.validation.json``, ``validation.json`` inside an
    ONNX folder) for files no validate*.json already covers."""
    reports = _read_json_files(output_dir, "validate")
    covered = {Path(r.get("artifact") or "").name for _, r in reports}
    for dirpath, _, filenames in _walk(output_dir):
        for name in sorted(filenames):
            if not (name.endswith(REPORT_SUFFIX) or name == REPORT_SUFFIX.lstrip(".")):
                continue
            path = dirpath / name
            report = _read_json(path, "re-run the export with --validate")
            if "metrics" in report and Path(report.get("artifact") or "").name not in covered:
                reports.append((path, report))
    return reports


# ----------------------------------------------------------------------------------------------- formatting
def format_size(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def _bits_text(bits: float) -> str:
    from paretoq_export.canonical.grids import format_bits

    return format_bits(bits) + (" (ternary)" if bits == 1.58 else " (binary)" if bits == 1.0 else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _artifact_name(value: Any) -> str:
    return Path(str(value)).name if value else "—"


# ----------------------------------------------------------------------------------------------- sections
def _recipe_rows(recipe: dict, checkpoint: CheckpointSummary | None, artifacts: list[ArtifactSummary]) -> list[list]:
    rows: list[list] = []
    method = recipe.get("method")
    if recipe.get("imported_from"):
        rows.append(["Method", f"imported ({recipe['imported_from']})"])
    elif method:
        rows.append(["Method", _METHODS.get(method, method)])
    if recipe.get("source"):
        rows.append(["Source model", recipe["source"]])
    if recipe.get("source_note"):  # e.g. the source weights already sat on a 4-bit grid
        rows.append(["Note on the source", recipe["source_note"]])
    qat = recipe.get("qat_config") or {}
    if qat.get("bits") is not None:
        rows.append(["Weight bits (q/k/v/o/gate/up/down)", _bits_text(float(qat["bits"]))])
    elif recipe.get("w_bits") is not None:
        rows.append(["Weight bits", _bits_text(float(recipe["w_bits"]))])
    if qat.get("overrides"):
        rows.append(["Per-module overrides", ", ".join(f"{k}={_num(v, 'g')}" for k, v in qat["overrides"].items())])
    if qat:
        float_dtype = recipe.get("float_dtype", "float")
        for key, label in (("embedding_bits", "Embedding bits"), ("lm_head_bits", "lm_head bits")):
            value = qat.get(key)
            rows.append([label, f"{value:g}" if value is not None else f"not quantized ({float_dtype})"])
    per_bits = Counter(checkpoint.module_bits().values()) if checkpoint is not None else Counter()
    if per_bits:
        from paretoq_export.canonical.grids import format_bits

        counts = (f"{n} at {format_bits(b)}-bit" for b, n in sorted(per_bits.items()))
        rows.append(["Quantized matrices", ", ".join(counts)])
    train = recipe.get("train") or {}
    if train.get("steps") is not None:
        rows.append(["Optimizer steps", train["steps"]])
        block = (recipe.get("data") or {}).get("block_size") or train.get("block_size")
        if train.get("batch_size") is not None:
            accum = train.get("grad_accum")
            batch = (f"{train['batch_size']} x {accum} (micro-batch x accumulation)" if accum is not None
                     else f"{train['batch_size']} blocks")
            rows.append(["Batch", batch + (f" of {block} tokens" if block else "") + " per device"])
    if recipe.get("train_tokens") is not None:
        rows.append(["Training tokens", f"{int(recipe['train_tokens']):,}"])
    if train:
        rows.append(["Peak learning rate", _num(train["lr"], "g") if train.get("lr") is not None
                     else "the trainer's default for these bits (value not recorded in the checkpoint)"])
        for key, label in (("warmup_steps", "Warm-up steps"), ("weight_decay", "Weight decay"),
                           ("min_lr_ratio", "Final lr / peak lr (cosine)")):
            if train.get(key) is not None:
                rows.append([label, train[key]])
        if train.get("distill_weight"):
            rows.append(["Distillation weight (KL to the float model)", train["distill_weight"]])
    sources = (recipe.get("data") or {}).get("sources") or train.get("data")
    if sources:
        rows.append(["Training data", ", ".join(map(str, sources if isinstance(sources, list) else [sources]))])
    if recipe.get("seconds") is not None:
        rows.append(["Training time", f"{float(recipe['seconds']):.0f} s"])
    if recipe.get("float_dtype") and not qat:
        rows.append(["Unquantized tensors", recipe["float_dtype"]])
    return rows


def _files_section(artifacts: list[ArtifactSummary]) -> str:
    rows = [[f"`{a.path.as_posix()}" + ("/`" if a.folder else "`"), a.format, a.containers,
             _num(a.linear_bpw, ".3f"), _num(a.total_bpw, ".3f"), format_size(a.size_bytes)] for a in artifacts]
    text = _table(["File", "Format", "Containers (tensor count)", "Bits/weight (quantized linears)",
                   "Bits/weight (all tensors)", "Size"], rows)
    notes = [f"- `{a.path.as_posix()}`: {n}" for a in artifacts for n in a.notes]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def _accuracy_section(validations: list[tuple[Path, dict]]) -> str:
    rows = []
    for _, v in validations:
        rb, m = v.get("readback") or {}, v.get("metrics") or {}
        readback = _readback_text(rb)
        rows.append([_artifact_name(v.get("artifact")), v.get("format", "—"), readback, _num(m.get("tokens"), ","),
                     _num(m.get("kl_mean"), ".3g"), _num(m.get("top1"), ".1%"), _num(m.get("ppl_reference"), ".3f"),
                     _num(m.get("ppl_artifact"), ".3f"), _num(m.get("ppl_ratio"), ".4f")])
    parts = ["Logits of each file in its runtime against the PyTorch model rebuilt from the checkpoint, on held-out "
             "text (KL: mean per token; PPL ratio: artifact / reference). Read-back: the stored weights decoded "
             "again and compared with the checkpoint's integer codes and steps.",
             _table(["File", "Format", "Read-back", "Tokens", "Mean KL", "Top-1 agreement", "PPL (reference)",
                     "PPL (file)", "PPL ratio"], rows)]
    notes = [f"- `{_artifact_name(v.get('artifact'))}`: {(v.get('readback') or {}).get('note')}"
             for _, v in validations if (v.get("readback") or {}).get("note")]
    if notes:
        parts.append("\n".join(notes))
    for _, v in validations:
        zs = v.get("zeroshot")
        if not zs or not zs.get("reference"):
            continue
        ref, art = zs.get("reference") or {}, zs.get("artifact") or {}
        tasks = [t for t in ref if t != "average"] + (["average"] if "average" in ref else [])
        zrows = []
        for task in tasks:
            r, a = ref.get(task) or {}, art.get(task) or {}
            zrows.append([task, _num(r.get("n"), ","), _num(r.get("acc"), ".1%"), _num(r.get("acc_norm"), ".1%"),
                          _num(a.get("acc"), ".1%"), _num(a.get("acc_norm"), ".1%")])
        parts.append(f"Zero-shot accuracy, `{_artifact_name(v.get('artifact'))}` vs the PyTorch reference:\n\n"
                     + _table(["Task", "n", "acc (reference)", "acc_norm (reference)", "acc (file)",
                               "acc_norm (file)"], zrows))
    return "\n\n".join(parts)


def _readback_text(rb: dict) -> str:
    """validate's readback: {"checked": tensors compared, "exact": tensors bit-exact, "mismatches": [names]}."""
    checked, exact, lossy = rb.get("checked"), rb.get("exact"), rb.get("mismatches") or []
    if checked is None or exact is None:
        return "—"
    if not checked:
        return "not read back (see note)"
    if exact == checked and not lossy:
        return f"bit-exact ({checked} tensors)"
    return f"{exact}/{checked} bit-exact" + (f", {len(lossy)} lossy on request" if lossy else "")


def _range(d: Any) -> str:
    if not isinstance(d, dict) or d.get("median") is None:
        return "—"
    text = _num(d["median"], ",.1f")
    if d.get("min") is not None and d.get("max") is not None:
        text += f" ({_num(d['min'], ',.1f')}–{_num(d['max'], ',.1f')})"
    return text


def _speed_section(benches: list[tuple[Path, dict]]) -> str:
    parts = []
    for _, b in benches:
        machine = b.get("machine") or {}
        desc = ", ".join(x for x in (
            str(machine["cpu"]) if machine.get("cpu") else "",
            f"{machine['cores']} cores" if machine.get("cores") else "",
            f"{b['threads']} thread{'s' if b['threads'] != 1 else ''}" if b.get("threads") else "",
            f"measured memory read {machine['bandwidth_gbs']:.1f} GB/s" if machine.get("bandwidth_gbs") else "",
        ) if x)
        rows = []
        for r in b.get("results") or []:
            bound = "—"
            if r.get("fraction_of_bound") is not None:
                bound = f"{r['fraction_of_bound']:.0%}" + (f" of {r['bound_tg_tps']:,.0f}" if r.get("bound_tg_tps")
                                                           else "")
            ratios = " / ".join(_num(r.get(k), ".2f") + "x" if r.get(k) is not None else "—"
                                for k in ("pp_ratio", "tg_ratio"))
            rows.append([_artifact_name(r.get("artifact")), r.get("format", "—"), format_size(r.get("size_bytes")),
                         _num(r.get("load_s"), ".2f"), _range(r.get("pp_tps")), _range(r.get("tg_tps")),
                         _num(r.get("peak_rss_mib"), ",.0f"), format_size(r.get("bytes_per_token")), bound, ratios])
        parts.append((f"Measured on {desc}.\n\n" if desc else "")
                     + _table(["File", "Format", "Size", "Load (s)", "Prefill tok/s, median (min–max)",
                               "Decode tok/s, median (min–max)", "Peak RSS (MiB)", "Bytes read per token",
                               "Decode vs memory-bandwidth bound", "Prefill / decode speed ratio"], rows))
        first = _artifact_name(((b.get("results") or [{}])[0]).get("artifact"))
        parts[-1] += f"\n\nSpeed ratios: median tokens/s relative to `{first}`, the first file of this run."
    return "\n\n".join(parts)


def _how_to_run(artifacts: list[ArtifactSummary], repo_id: str | None) -> str:
    parts = []
    by_format: dict[str, list[ArtifactSummary]] = {}
    for a in artifacts:
        by_format.setdefault(a.format, []).append(a)
    if repo_id:
        parts.append(f"Download the files with `hf download {repo_id} --local-dir {repo_id.split('/')[-1]}` (or one "
                     f"file: `hf download {repo_id} FILE --local-dir .`).")
    for fmt in FORMATS.values():
        if fmt.title in by_format:
            parts.append(fmt.how_to_run(by_format[fmt.title][0].path.as_posix(), EXAMPLE_PROMPT))
    if "checkpoint" in by_format:
        d = by_format["checkpoint"][0].path.as_posix()
        parts.append(
            "### PyTorch (the canonical checkpoint)\n\n"
            f"`{d}/` holds the integer codes and fp16 steps every file above was written from; with paretoq-export:"
            f"\n\n```python\nfrom paretoq_export.canonical.checkpoint import QuantizedCheckpoint\n\n"
            f"model = QuantizedCheckpoint.load(\"{d}\").build_reference_model()  # transformers model, exact weights\n"
            f"tokenizer = QuantizedCheckpoint.load(\"{d}\").load_tokenizer()\n```")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------- the card
@dataclass
class CardContents:
    text: str  # README.md: front matter + body
    base_model: str | None
    license: str | None
    library_name: str | None
    tags: list[str]


def _resolve_license(explicit: str | None, checkpoint: CheckpointSummary | None,
                     artifacts: list[ArtifactSummary]) -> str | None:
    found = None
    if checkpoint is not None:
        found = checkpoint.config.get("license") or checkpoint.recipe.get("license")
    found = found or next((a.license for a in artifacts if a.license), None)
    if found and explicit and explicit.lower() != str(found).lower():
        log.warning("the base model's metadata says license %s; --license %s is ignored (a quantized model keeps "
                    "its base model's license)", found, explicit)
    return str(found).lower() if found else explicit


def _resolve_base_model(explicit: str | None, checkpoint: CheckpointSummary | None,
                        artifacts: list[ArtifactSummary]) -> str | None:
    if explicit is not None and not _HUB_ID.match(explicit):
        raise ModelCardError(f"--base-model {explicit!r} is not a Hub model id: give it as ORG/NAME "
                             "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    candidates = [explicit, checkpoint.recipe.get("base_model") if checkpoint else None]
    candidates += [(a.recipe or {}).get("base_model") for a in artifacts] + [a.base_model for a in artifacts]
    # a local path or file stem recorded as the base (e.g. "GGUF my-model") cannot go in the Hub metadata
    return next((str(v) for v in candidates if v and _HUB_ID.match(str(v))), None)


def build_model_card(output_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                     base_model: str | None = None, license: str | None = None,
                     repo_id: str | None = None) -> CardContents:
    """The card's text and front matter, from what ``output_dir`` holds (nothing is written)."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ModelCardError(f"output folder {output_dir} does not exist: give the folder holding the exported files")
    ckpt_path = Path(checkpoint) if checkpoint is not None else find_checkpoint(output_dir)
    ckpt = read_checkpoint(ckpt_path) if ckpt_path is not None else None
    artifacts = find_artifacts(output_dir, ckpt.n_params if ckpt else None)
    if ckpt is None and not artifacts:
        raise ModelCardError(f"{output_dir} holds no .gguf, ONNX folder, .pte or paretoq checkpoint: export the "
                             "model there first (paretoq-export --format gguf CKPT -o DIR), or pass --checkpoint")
    validations = _validation_reports(output_dir)
    benches = _read_json_files(output_dir, "bench")

    recipe = dict(ckpt.recipe) if ckpt else next((dict(a.recipe) for a in artifacts if a.recipe), {})
    base = _resolve_base_model(base_model, ckpt, artifacts)
    license_ = _resolve_license(license, ckpt, artifacts)
    bits = sorted(set(ckpt.module_bits().values() if ckpt else ()) | {b for a in artifacts for b in a.bits})
    formats = [f for f in _FORMAT_LIBRARY if any(a.format == f for a in artifacts)]
    library = _FORMAT_LIBRARY[formats[0]] if formats else None
    tags = ["paretoq", "quantized"] + (["qat"] if recipe.get("method") == "qat" else [])
    tags += [_FORMAT_LIBRARY[f] for f in formats] + [t for b in bits for t in _BIT_TAGS.get(b, ())]

    data = ModelCardData(
        base_model=base, license=license_, library_name=library, tags=tags, pipeline_tag="text-generation",
        **({"base_model_relation": "quantized"} if base else {}),
    )
    from paretoq_export.canonical.grids import format_bits

    bits_text = "/".join(format_bits(b) for b in bits) or "float"
    base_name = (base or recipe.get("base_model") or "model").rstrip("/").split("/")[-1]
    title = repo_id.split("/")[-1] if repo_id else f"{base_name} ParetoQ {bits_text}-bit"
    body = [f"# {title}", _intro(base, bits, formats)]
    rows = _recipe_rows(recipe, ckpt, artifacts)
    if rows:
        body += ["## Recipe", _table(["Setting", "Value"], rows)]
    listed = list(artifacts)
    if ckpt is not None and _inside(ckpt.path, output_dir) and (ckpt.path / "model.safetensors").is_file():
        listed.append(describe_checkpoint(ckpt, output_dir))
    if listed:
        body += ["## Files", _files_section(listed)]
    if validations:
        body += ["## Accuracy", _accuracy_section(validations)]
    if benches:
        body += ["## Speed", _speed_section(benches)]
    pareto = sorted(output_dir.glob(PARETO_PAGE))
    if pareto:
        body += ["## Size / accuracy / speed trade-off",
                 f"Every bit-width side by side: [{PARETO_PAGE}]({PARETO_PAGE})."
                 + ("\n\n![held-out perplexity vs file size](pareto_size.png)"
                    if (output_dir / "pareto_size.png").is_file() else "")]
    if listed:
        body += ["## How to run", _how_to_run(listed, repo_id)]
    body += ["## How it was made",
             "With paretoq-export, after [ParetoQ](https://arxiv.org/abs/2502.02631) (Liu et al., 2025): each "
             "quantized weight is `w = s * (q - z)` with integer code `q`, an fp16 step `s` per output row and the "
             "grid's zero `z`; each exported file stores exactly those values in a container its runtime executes "
             "(any exception is noted under Files), checked by decoding the file back."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")
    return CardContents(str(card), base, license_, library, tags)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _intro(base: str | None, bits: list[float], formats: list[str]) -> str:
    from paretoq_export.canonical.grids import format_bits

    what = f"[{base}](https://huggingface.co/{base})" if base else "a causal language model"
    bit_text = "/".join(format_bits(b) for b in bits)
    text = f"{what} quantized with ParetoQ" + (f" to {bit_text}-bit weights" if bits else "")
    if formats:
        text += ", exported to " + ", ".join(formats)
    return text + "."


def write_model_card(output_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                     base_model: str | None = None, license: str | None = None,
                     repo_id: str | None = None) -> Path:
    """Write OUTPUT_DIR/README.md (atomically) and return its path."""
    contents = build_model_card(output_dir, checkpoint, base_model, license, repo_id)
    return write_text_atomic(Path(output_dir) / CARD_FILE, contents.text)


# ----------------------------------------------------------------------------------------------- CLI
HELP = "write the Hub model card (README.md) of an output folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="folder holding the exported files (and validate*/bench*.json)")
    parser.add_argument("--checkpoint", default=None,
                        help="the canonical checkpoint (default: a paretoq checkpoint found inside OUTPUT_DIR)")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model (default: from the checkpoint)")
    parser.add_argument("--license", default=None,
                        help="license id when the base model's metadata has none (e.g. apache-2.0)")
    parser.add_argument("--repo-id", default=None, help="the Hub repo the card is for (title and download commands)")


def run(args: argparse.Namespace) -> int:
    contents = build_model_card(args.output_dir, args.checkpoint, args.base_model, args.license, args.repo_id)
    path = write_text_atomic(Path(args.output_dir) / CARD_FILE, contents.text)
    print(f"wrote {path} (library {contents.library_name or '-'}, license {contents.license or 'not set'}, "
          f"tags {', '.join(contents.tags)})")
    if not contents.license:
        print("note: no license found in the base model's metadata: pass --license (e.g. apache-2.0)")
    return 0
