"""`paretoq-export card OUTPUT_DIR`: the Hugging Face Hub model card (README.md) of an export folder.

Everything on the card is read from the folder, never assumed:

- the recipe from the canonical checkpoint's config.json (``quantization_config.recipe`` and ``.modules``), or,
  without a checkpoint, from the ``paretoq.recipe`` metadata the GGUF / ONNX writers embed;
- one row per exported file: GGUF tensor types and sizes through ``gguf.GGUFReader``, ONNX MatMulNBits containers
  and initializer sizes through ``onnx`` (graph only, external data untouched), ExecuTorch .pte sizes and the
  target recorded in its name;
- accuracy from ``validate*.json`` and speed from ``bench*.json`` files (the schemas of ``paretoq-export validate``
  and ``bench``); a ``pareto.md`` is linked.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from paretoq_export.atomic import write_text_atomic

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
CHECKPOINT_CONFIG = "config.json"
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx.data"
PARETO_PAGE = "pareto.md"
EXAMPLE_PROMPT = "The capital of France is"
# Hub repo ids: "org/name" (base_model must name a Hub model, or the Hub rejects the card's metadata)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Leftovers of interrupted writes and training state: never described (the writers use these names)
_SKIPPED_NAME = re.compile(r"(\.partial-|\.old-\d+|\.tmp$|\.train$|^__pycache__$)")
_BIT_TAGS = {1.0: ("1-bit", "binary"), 1.58: ("1.58-bit", "ternary"), 2.0: ("2-bit",), 3.0: ("3-bit",),
             4.0: ("4-bit",), 8.0: ("8-bit",)}
_FORMAT_LIBRARY = {"GGUF": "gguf", "ONNX": "onnx", "ExecuTorch": "executorch"}  # library_name, in preference order
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


@dataclass
class ArtifactSummary:
    path: Path  # relative to the output folder (an ONNX folder for ONNX)
    format: str  # "GGUF" | "ONNX" | "ExecuTorch"
    size_bytes: int
    containers: str  # e.g. "Q2_K x84, Q4_0 x14, F32 x9" (count of tensors per container)
    linear_bpw: float | None = None  # stored bits per weight of the quantized linears
    total_bpw: float | None = None  # stored bits per weight over every tensor of the file
    bits: list[float] = field(default_factory=list)  # the ParetoQ bit-widths the file holds
    license: str | None = None
    base_model: str | None = None
    recipe: dict | None = None  # paretoq.recipe embedded in the file
    notes: list[str] = field(default_factory=list)


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
    from paretoq_export.checkpoint import WEIGHTS_FILE

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

    from paretoq_export.checkpoint import WEIGHTS_FILE

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
        containers="packed codes + fp16 row steps: " + _count_text(grids),
        linear_bpw=8 * lin_bytes / lin_elems if lin_elems else None,
        total_bpw=8 * total_bytes / ckpt.n_params if ckpt.n_params else None,
        bits=sorted(set(ckpt.module_bits().values())),
    )


_SAFETENSORS_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8,
                         "I64": 8}


def _field(reader, key: str) -> Any:
    f = reader.get_field(key)
    return f.contents() if f is not None else None


def describe_gguf(path: Path, root: Path) -> ArtifactSummary:
    """Tensor types, sizes and ParetoQ metadata of a GGUF file (header and tensor table only)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = list(reader.tensors)
    counts = Counter(t.tensor_type.name for t in tensors)
    quantized = set(_field(reader, "paretoq.quantized_tensors") or []) - {""}
    total_bytes = sum(int(t.n_bytes) for t in tensors)
    total_elems = sum(int(t.n_elements) for t in tensors)
    lin = [t for t in tensors if t.name in quantized]
    lin_elems = sum(int(t.n_elements) for t in lin)
    recipe_text = _field(reader, "paretoq.recipe")
    try:
        recipe = json.loads(recipe_text) if recipe_text else None
    except json.JSONDecodeError:
        recipe = None
    org, name = _field(reader, "general.base_model.0.organization"), _field(reader, "general.base_model.0.name")
    base = f"{org}/{name}" if org and name else None
    notes = []
    if "Q2_0" in counts:
        notes.append("Q2_0 tensors need a llama.cpp recent enough to have ggml type Q2_0 (the one vendored in "
                     "llama-cpp-python 0.3.36 has it; it has no x86 SIMD kernel, so it is slow on x86)")
    lossy = [x for x in (_field(reader, "paretoq.lossy_tensors") or []) if x]
    if lossy:
        notes.append(f"{len(lossy)} tensors were stored in a lossy type on request (--allow-lossy)")
    return ArtifactSummary(
        path=path.relative_to(root), format="GGUF", size_bytes=path.stat().st_size,
        containers=_count_text(counts),
        linear_bpw=8 * sum(int(t.n_bytes) for t in lin) / lin_elems if lin_elems else None,
        total_bpw=8 * total_bytes / total_elems if total_elems else None,
        bits=sorted({float(b) for b in (_field(reader, "paretoq.tensor_bits") or []) if b}),
        license=_field(reader, "general.license"), base_model=base, recipe=recipe, notes=notes,
    )


def _count_text(counts: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_onnx(folder: Path, root: Path) -> ArtifactSummary:
    """MatMulNBits containers and stored bytes of an ONNX decoder folder, from the graph (external data unread)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(folder / ONNX_MODEL), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    inits = {t.name: t for t in model.graph.initializer}

    def nbytes(name: str) -> int:
        t = inits.get(name)
        return math.prod(t.dims) * tensor_dtype_to_np_dtype(t.data_type).itemsize if t is not None else 0

    counts: Counter = Counter()
    packed_names: set[str] = set()
    lin_bytes = lin_elems = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        counts[f"MatMulNBits {attrs.get('bits', 4)}-bit/{attrs.get('block_size')}"] += 1
        names = [n for n in node.input[1:4] if n in inits]
        packed_names.update(names)
        lin_bytes += sum(nbytes(n) for n in names)
        lin_elems += int(attrs["K"]) * int(attrs["N"])
    other = [n for n in inits if n not in packed_names]
    counts.update(f"{onnx.TensorProto.DataType.Name(inits[n].data_type)}" for n in other)
    total_bytes = lin_bytes + sum(nbytes(n) for n in other)
    total_elems = lin_elems + sum(math.prod(inits[n].dims) for n in other)
    size = sum((folder / f).stat().st_size for f in (ONNX_MODEL, ONNX_DATA) if (folder / f).is_file())
    try:
        recipe = json.loads(meta["paretoq.recipe"]) if "paretoq.recipe" in meta else None
        linears = json.loads(meta.get("paretoq.quantized_linears", "{}"))
    except json.JSONDecodeError:
        recipe, linears = None, {}
    notes = []
    if "paretoq.accuracy_level" in meta:
        level = meta["paretoq.accuracy_level"]
        notes.append(f"accuracy_level {level}: " + ("float activations (exact)" if level == "0"
                                                     else "onnxruntime quantizes activations to int8 (faster)"))
    return ArtifactSummary(
        path=folder.relative_to(root), format="ONNX", size_bytes=size, containers=_count_text(counts),
        linear_bpw=8 * lin_bytes / lin_elems if lin_elems else None,
        total_bpw=8 * total_bytes / total_elems if total_elems else None,
        bits=sorted({float(v["bits"]) for v in linears.values() if v.get("bits")}), recipe=recipe, notes=notes,
    )


def describe_pte(path: Path, root: Path, n_params: int | None) -> ArtifactSummary:
    """An ExecuTorch program: its size, and the target its writer recorded in the file name."""
    name = path.name
    if name.endswith("-xnnpack.pte"):
        containers = "int4 per-channel codes, XNNPACK (int8 dynamic activations)"
    elif name.endswith("-arm64-lowbit.pte"):
        containers = "torchao low-bit kernels (Arm64 builds only)"
    else:
        containers = "ExecuTorch program"
    notes = []
    emb = re.search(r"-emb(\d+)-", name)
    if emb:
        containers += f"; {emb.group(1)}-bit embedding"
        notes.append(f"the float embedding table was rounded to {emb.group(1)} bits per row at export (lossy)")
    size = path.stat().st_size
    return ArtifactSummary(path=path.relative_to(root), format="ExecuTorch", size_bytes=size, containers=containers,
                           total_bpw=8 * size / n_params if n_params else None, notes=notes)


def find_artifacts(output_dir: Path, n_params: int | None = None) -> list[ArtifactSummary]:
    found: list[ArtifactSummary] = []
    for dirpath, _, filenames in _walk(output_dir):
        if ONNX_MODEL in filenames:
            found.append(describe_onnx(dirpath, output_dir))
        for name in filenames:
            if name.endswith(".gguf"):
                found.append(describe_gguf(dirpath / name, output_dir))
            elif name.endswith(".pte"):
                found.append(describe_pte(dirpath / name, output_dir, n_params))
    return sorted(found, key=lambda a: (_FORMAT_ORDER.index(a.format), str(a.path)))


def _read_json_files(output_dir: Path, prefix: str) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(output_dir.glob(f"{prefix}*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelCardError(f"{path} is not valid JSON ({exc}): re-run `paretoq-export {prefix.rstrip('_')}` "
                                 "or remove it") from None
        if not isinstance(data, dict):
            raise ModelCardError(f"{path} does not hold a JSON object: re-run `paretoq-export {prefix}` or remove it")
        out.append((path, data))
    return out


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
    from qat.grids import format_bits

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
        from qat.grids import format_bits

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
    rows = [[f"`{a.path.as_posix()}" + ("/`" if a.format in ("ONNX", "checkpoint") else "`"), a.format, a.containers,
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
    if "GGUF" in by_format:
        f = by_format["GGUF"][0].path.as_posix()
        parts.append(
            "### llama.cpp (GGUF)\n\n"
            f"```bash\nllama-cli -m {f} -p \"{EXAMPLE_PROMPT}\" -n 64\nllama-server -m {f}   # OpenAI-compatible "
            "server on port 8080\n```\n\n"
            "llama-cpp-python:\n\n"
            f"```python\nfrom llama_cpp import Llama\n\nllm = Llama(model_path=\"{f}\", n_ctx=2048)\n"
            f"print(llm(\"{EXAMPLE_PROMPT}\", max_tokens=64)[\"choices\"][0][\"text\"])\n```"
            "\n\nNever re-quantize these files with llama-quantize: their tensors already hold the trained grid "
            "exactly.")
    if "ONNX" in by_format:
        d = by_format["ONNX"][0].path.as_posix()
        parts.append(
            "### onnxruntime (ONNX)\n\n"
            "onnxruntime-genai reads the folder as it is (`genai_config.json` is inside):\n\n"
            f"```python\nimport onnxruntime_genai as og\n\nmodel = og.Model(\"{d}\")\ntokenizer = og.Tokenizer(model)\n"
            "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=64)\n"
            "generator = og.Generator(model, params)\n"
            f"generator.append_tokens(tokenizer.encode(\"{EXAMPLE_PROMPT}\"))\n"
            "while not generator.is_done():\n    generator.generate_next_token()\n"
            "print(tokenizer.decode(generator.get_sequence(0)))\n```\n\n"
            "Plain onnxruntime, greedy decoding with the KV cache:\n\n"
            f"```python\n{onnxruntime_snippet(d)}```")
    if "ExecuTorch" in by_format:
        f = by_format["ExecuTorch"][0].path.as_posix()
        tok_dir = Path(f).parent.as_posix()
        parts.append(
            "### ExecuTorch (.pte)\n\n"
            "ExecuTorch's LLM runner (`examples/models/llama`, built with XNNPACK), with the tokenizer file beside "
            "the program:\n\n"
            f"```bash\nllama_main --model_path={f} --tokenizer_path={tok_dir}/tokenizer.json "
            f"--prompt=\"{EXAMPLE_PROMPT}\" --seq_len=128\n```\n\n"
            "Python (`pip install executorch`):\n\n"
            f"```python\n{executorch_snippet(f, tok_dir)}```")
    if "checkpoint" in by_format:
        d = by_format["checkpoint"][0].path.as_posix()
        parts.append(
            "### PyTorch (the canonical checkpoint)\n\n"
            f"`{d}/` holds the integer codes and fp16 steps every file above was written from; with paretoq-export:"
            f"\n\n```python\nfrom paretoq_export.checkpoint import QuantizedCheckpoint\n\n"
            f"model = QuantizedCheckpoint.load(\"{d}\").build_reference_model()  # transformers model, exact weights\n"
            f"tokenizer = QuantizedCheckpoint.load(\"{d}\").load_tokenizer()\n```")
    return "\n\n".join(parts)


def onnxruntime_snippet(folder: str) -> str:
    """Greedy generation from an exported ONNX folder with plain onnxruntime (tested in tests/test_model_card.py)."""
    return f'''import json

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

folder = "{folder}"
decoder = json.load(open(f"{{folder}}/genai_config.json"))["model"]["decoder"]
session = ort.InferenceSession(f"{{folder}}/model.onnx", providers=["CPUExecutionProvider"])
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer("{EXAMPLE_PROMPT}", return_tensors="np").input_ids
empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
past = {{f"past_key_values.{{i}}.{{kv}}": empty
        for i in range(decoder["num_hidden_layers"]) for kv in ("key", "value")}}
step, generated = ids, []
for _ in range(32):
    n_past = next(iter(past.values())).shape[2]
    logits, *present = session.run(None, {{
        "input_ids": step, "attention_mask": np.ones((1, n_past + step.shape[1]), np.int64),
        "position_ids": np.arange(n_past, n_past + step.shape[1], dtype=np.int64)[None], **past}})
    past = dict(zip(past, present))
    step = logits[:, -1:].argmax(-1)
    generated.append(int(step[0, 0]))
print(tokenizer.decode(generated))
'''


def executorch_snippet(pte: str, tokenizer_dir: str) -> str:
    """Greedy generation from a .pte with executorch.runtime (tested in tests/test_model_card.py when available)."""
    return f'''import torch
from executorch.runtime import Runtime
from transformers import PreTrainedTokenizerFast

tokenizer = PreTrainedTokenizerFast(tokenizer_file="{tokenizer_dir}/tokenizer.json")
forward = Runtime.get().load_program("{pte}").load_method("forward")
ids = tokenizer("{EXAMPLE_PROMPT}").input_ids
logits = forward.execute([torch.tensor([ids]), torch.arange(len(ids))])[0]  # [1, tokens, vocab]
generated = []
for pos in range(len(ids), len(ids) + 32):
    generated.append(int(logits[0, -1].argmax()))
    logits = forward.execute([torch.tensor([[generated[-1]]]), torch.tensor([pos])])[0]
print(tokenizer.decode(generated))
'''


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
    validations = _read_json_files(output_dir, "validate")
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
    from qat.grids import format_bits

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
    from qat.grids import format_bits

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
