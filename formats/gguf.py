"""GGUF writer for the canonical checkpoint: exact block types chosen per tensor, llama.cpp-ready metadata.

    export_gguf(checkpoint, output, GGUFOptions())   -> GGUFExportResult
    verify_gguf_readback(path, checkpoint)           -> every tensor read back with gguf-py equals the checkpoint
    validate_gguf(path, checkpoint, token_ids)       -> read-back + llama.cpp logits vs the PyTorch reference

Quantized weights are encoded by formats.gguf_blocks from the integer codes and fp16 steps (DESIGN.md section 3),
never re-quantized from floats. A tensor whose columns do not fit the preferred block falls back to the smallest
exact container (Q4_0 for 576-wide rows), recorded in the log and in ``paretoq.fallbacks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from formats.gguf_blocks import ENCODERS, dequantize_codes, encoder_for
from paretoq_export.atomic import atomic_file
from qat.grids import Grid, format_bits

log = logging.getLogger(__name__)

PARETOQ_VERSION = "0.1.0"
QUANTIZED_BY = "paretoq-export"

_ARCHS = {  # HF model_type -> (gguf arch, permute Q/K rows for llama.cpp's rope layout)
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
}
_HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

# preferred container per grid (ternary/binary follow --ternary-type); fallbacks when a row does not fit
_PREFERRED = {"seq2": T.Q2_K, "lsq3": T.Q3_K, "lsq4": T.Q4_0, "lsq8": T.Q8_0}
_FALLBACKS = (T.Q4_0, T.Q8_0, T.F32)
_FILE_TYPES = {
    T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, T.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
    T.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
}
# lossy types gguf-py can quantize floats into (embedding/output size options, --allow-lossy overrides)
_LOSSY_OK = {T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0}
class GGUFExportError(ValueError):
    """A GGUF export the user can fix; the message is one line naming the problem and the fix."""


@dataclass
class GGUFOptions:
    ternary_type: str = "TQ2_0"  # container for ternary and binary grids: TQ2_0 (fast) or TQ1_0 (small)
    embedding_type: str | None = None  # token_embd; None: F16 (F32 when F16 would round)
    output_type: str | None = None  # output.weight (untied models only)
    tensor_types: Sequence[str] = ()  # "REGEX=TYPE", matched (re.search) against GGUF and HF tensor names
    allow_lossy: bool = False
    overwrite: bool = False
    name: str | None = None  # general.name; default from the base model
    base_model: str | None = None  # hub id of the base model; default from the checkpoint's recipe
    license: str | None = None
    progress: bool | None = None  # tqdm: None = only on a terminal


@dataclass
class TensorRecord:
    hf_name: str
    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int
    grid: str | None
    bits: float | None
    reason: str
    fallback: bool = False
    lossy: bool = False


@dataclass
class GGUFExportResult:
    path: Path
    tensor_types: dict[str, str]  # gguf tensor name -> ggml type name
    nbytes: int
    fallbacks: list[str]
    lossy: list[str]
    file_type: str
    seconds: float
    records: list[TensorRecord] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensor_types.values():
            out[t] = out.get(t, 0) + 1
        return out


class TypeChoice(NamedTuple):
    ggml_type: T
    reason: str
    fallback: bool = False
    lossy: bool = False


# ----------------------------------------------------------------------------------------------- type choice
def parse_type(name: str, what: str = "type") -> T:
    try:
        return T[str(name).strip().upper()]
    except KeyError:
        known = sorted({t.name for t in ENCODERS} | {t.name for t in _LOSSY_OK})
        raise GGUFExportError(f"unknown GGUF {what} {name!r}: use one of {', '.join(known)}") from None


def parse_tensor_types(items: Sequence[str] | dict | None) -> list[tuple[re.Pattern, T]]:
    """``--tensor-type NAME_REGEX=TYPE`` (llama-quantize style) -> ordered (pattern, type) rules."""
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    rules = []
    for item in items or ():
        pattern, sep, type_name = str(item).rpartition("=")
        if not sep or not pattern:
            raise GGUFExportError(f"--tensor-type {item!r} is not NAME_REGEX=TYPE (e.g. attn_v=Q8_0)")
        try:
            rules.append((re.compile(pattern), parse_type(type_name, "tensor type")))
        except re.error as exc:
            raise GGUFExportError(f"--tensor-type {item!r}: bad regex ({exc})") from None
    return rules


def _requested_type(gguf_name: str, hf_name: str, options: GGUFOptions) -> tuple[T | None, str]:
    for pattern, ggml_type in parse_tensor_types(options.tensor_types):
        if pattern.search(gguf_name) or pattern.search(hf_name):
            return ggml_type, f"--tensor-type {pattern.pattern}={ggml_type.name}"
    if gguf_name.startswith("token_embd.") and options.embedding_type:
        return parse_type(options.embedding_type, "--embedding-type"), "--embedding-type"
    if gguf_name.startswith("output.") and options.output_type:
        return parse_type(options.output_type, "--output-type"), "--output-type"
    return None, ""


def choose_tensor_type(
    name: str,
    grid: Grid | None,
    shape: Sequence[int],
    options: GGUFOptions,
    *,
    hf_name: str | None = None,
    codes: np.ndarray | None = None,
    step: np.ndarray | None = None,
    values: np.ndarray | None = None,
) -> TypeChoice:
    """The GGUF type for one tensor and why. ``name`` is the GGUF name; quantized tensors pass grid, codes and
    step (so per-row scale exactness is checked), float tensors pass values."""
    hf_name = hf_name or name
    requested, source = _requested_type(name, hf_name, options)
    if len(shape) == 1:  # norms and biases: ggml wants F32 (the fp16 checkpoint values convert exactly)
        return TypeChoice(T.F32, "1-D tensor")
    cols = int(shape[-1])
    if grid is None:
        exact16 = values is None or bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))
        if requested is None:
            return TypeChoice(T.F16, "float tensor") if exact16 else TypeChoice(T.F32, "float tensor, not fp16-exact")
        if requested == T.F32 or (requested == T.F16 and exact16):
            return TypeChoice(requested, source)
        if requested not in _LOSSY_OK:
            raise GGUFExportError(f"{name}: {source} asks for {requested.name}, which cannot be written from float "
                                  f"weights here (use one of {', '.join(t.name for t in sorted(_LOSSY_OK))})")
        if cols % gguf.GGML_QUANT_SIZES[requested][0]:
            raise GGUFExportError(f"{name}: {source} {requested.name} needs columns divisible by "
                                  f"{gguf.GGML_QUANT_SIZES[requested][0]}, the tensor has {cols}")
        return TypeChoice(requested, f"{source} (float weights, rounded)", lossy=requested != T.F16 or not exact16)

    if requested is not None:
        reason = _why_not(requested, codes, step, grid, cols)
        if reason is None:
            return TypeChoice(requested, source)
        if not options.allow_lossy:
            raise GGUFExportError(
                f"{name}: {source} cannot hold the {grid.name} grid ({format_bits(grid.bits)}-bit) exactly: {reason}; "
                "choose an exact type or pass --allow-lossy")
        if requested not in _LOSSY_OK or cols % gguf.GGML_QUANT_SIZES[requested][0]:
            raise GGUFExportError(f"{name}: {source} {requested.name} cannot be written even lossily here ({reason})")
        return TypeChoice(requested, f"{source}, lossy: {reason}", lossy=True)

    if grid.name in ("ternary", "binary"):
        preferred = parse_type(options.ternary_type, "--ternary-type")
        if preferred not in (T.TQ1_0, T.TQ2_0):
            raise GGUFExportError(f"--ternary-type must be TQ1_0 or TQ2_0, not {preferred.name}")
    else:
        preferred = _PREFERRED[grid.name]
    first_reason = _why_not(preferred, codes, step, grid, cols)
    if first_reason is None:
        return TypeChoice(preferred, f"{grid.name} grid")
    for candidate in _FALLBACKS:
        if _why_not(candidate, codes, step, grid, cols) is None:
            return TypeChoice(candidate, f"fallback {preferred.name} -> {candidate.name}: {first_reason}", fallback=True)
    raise AssertionError("F32 holds every grid")


def _why_not(ggml_type: T, codes, step, grid: Grid, cols: int) -> str | None:
    if ggml_type not in ENCODERS:
        return f"no exact encoder for {ggml_type.name}"
    enc = ENCODERS[ggml_type]
    if codes is None:
        if cols % enc.block_size:
            return f"{cols} columns are not a multiple of the {ggml_type.name} block ({enc.block_size})"
        return None if enc.holds(grid) else f"{ggml_type.name} cannot represent the {grid.name} grid's levels"
    return enc.why_not_exact(codes, step, grid)


# ----------------------------------------------------------------------------------------------- model facts
def _arch(config: dict) -> tuple[str, gguf.MODEL_ARCH, bool]:
    model_type = config.get("model_type")
    if model_type not in _ARCHS:
        for hf_arch in config.get("architectures") or ():
            model_type = _HF_ARCHS.get(hf_arch, model_type)
    if model_type not in _ARCHS:
        archs = ", ".join(f"{k} ({v})" for v, k in _HF_ARCHS.items())
        raise GGUFExportError(f"architecture {config.get('architectures') or model_type!r} is not supported by the "
                              f"GGUF exporter: supported are {archs}")
    arch, permute = _ARCHS[model_type]
    return model_type, arch, permute


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope_params(config: dict) -> dict:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


def _permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of convert_hf_to_gguf's LlamaModel.permute: per head, interleave the two rotary halves."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _row_permutation(hf_name: str, rows: int, config: dict, permute: bool) -> np.ndarray | None:
    if not permute:
        return None
    if ".q_proj." in hf_name:
        return _permutation(rows, config["num_attention_heads"])
    if ".k_proj." in hf_name:
        return _permutation(rows, config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _base_model(ckpt, options: GGUFOptions) -> str | None:
    return options.base_model or ckpt.recipe.get("base_model") or None


def _basename(ckpt, options: GGUFOptions) -> str:
    base = _base_model(ckpt, options) or str(ckpt.config.get("_name_or_path") or "") or "model"
    return base.rstrip("/").split("/")[-1] or "model"


def _n_params(ckpt) -> int:
    total = sum(int(np.prod(q.shape)) for q in ckpt.quantized.values())
    return total + sum(int(t.numel()) for t in ckpt.tensors.values())


def default_filename(ckpt, options: GGUFOptions | None = None, file_type: str | None = None) -> str:
    """GGUF naming convention: <BaseName>-<SizeLabel>-<FineTune>-<Encoding>.gguf, e.g.
    SmolLM2-135M-Instruct-ParetoQ-2bit-Q2_K.gguf (the size label is left out when the name already has one)."""
    options = options or GGUFOptions()
    base = _basename(ckpt, options)
    size = gguf.size_label(_n_params(ckpt), 0, 0, 0)
    if re.search(r"-\d+(\.\d+)?[KMBT]\b", base, re.I):
        size = None
    bits = sorted({q.grid.bits for q in ckpt.quantized.values()})
    finetune = "ParetoQ-" + "-".join(f"{format_bits(b)}bit" for b in bits) if bits else "ParetoQ"
    if file_type is None:
        file_type = _preferred_summary_type(ckpt, options)
    return gguf.naming_convention(None, base, finetune, None, size, file_type) + ".gguf"


def _preferred_summary_type(ckpt, options: GGUFOptions) -> str:
    counts: dict[str, int] = {}
    for key, q in ckpt.quantized.items():
        try:
            t = choose_tensor_type(key, q.grid, q.shape, options).ggml_type.name
        except GGUFExportError:
            t = "F32"
        counts[t] = counts.get(t, 0) + int(np.prod(q.shape))
    return max(counts, key=counts.get) if counts else "F16"


def _load(checkpoint) -> tuple[Any, Path | None]:
    from paretoq_export.checkpoint import QuantizedCheckpoint

    if isinstance(checkpoint, QuantizedCheckpoint):
        return checkpoint, None
    return QuantizedCheckpoint.load(checkpoint), Path(checkpoint)


# ----------------------------------------------------------------------------------------------- export
def export_gguf(checkpoint, output: str | os.PathLike | None = None,
                options: GGUFOptions | None = None) -> GGUFExportResult:
    """Write the checkpoint as GGUF (atomically). ``output`` None or a directory: default file name there
    (next to a checkpoint given by path, else the current directory)."""
    options = options or GGUFOptions()
    t0 = time.perf_counter()
    ckpt, ckpt_path = _load(checkpoint)
    config = ckpt.config
    model_type, arch, permute = _arch(config)
    parse_tensor_types(options.tensor_types)  # fail early on a malformed rule
    for value, what in ((options.embedding_type, "--embedding-type"), (options.output_type, "--output-type")):
        if value:
            parse_type(value, what)
    if parse_type(options.ternary_type, "--ternary-type") not in (T.TQ1_0, T.TQ2_0):
        raise GGUFExportError(f"--ternary-type must be TQ1_0 or TQ2_0, not {options.ternary_type}")

    if output is None:
        out_dir = ckpt_path.parent if ckpt_path is not None else Path.cwd()
        output = out_dir / default_filename(ckpt, options)
    output = Path(output)
    if output.is_dir():
        output = output / default_filename(ckpt, options)
    if output.exists() and not options.overwrite:
        raise GGUFExportError(f"output {output} exists: pass --overwrite or choose another -o")
    output.parent.mkdir(parents=True, exist_ok=True)

    n_layers = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    items = _tensor_items(ckpt)
    records: list[TensorRecord] = []
    payloads: list[tuple[str, np.ndarray, T]] = []

    from tqdm.auto import tqdm

    disable = None if options.progress is None else not options.progress
    for hf_name in tqdm(items, desc="gguf tensors", unit="tensor", disable=disable):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"tensor {hf_name} has no GGUF name for {arch.name.lower()}: unsupported variant")
        rec, data, ggml_type = _encode_tensor(ckpt, hf_name, gguf_name, config, permute, options)
        records.append(rec)
        payloads.append((gguf_name, data, ggml_type))
        if rec.fallback:
            log.debug("%s: %s", gguf_name, rec.reason)
        if rec.lossy:
            log.warning("%s: lossy %s (%s)", gguf_name, rec.ggml_type, rec.reason)

    for extra in _extra_tensors(config, model_type, name_map):
        payloads.append(extra)
        records.append(TensorRecord("(generated)", extra[0], "F32", tuple(extra[1].shape), extra[1].nbytes,
                                    None, None, "llama3 rope factors"))

    file_type = _file_type(records)
    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_metadata(writer, ckpt, config, model_type, options, records, file_type)
        _add_tokenizer(writer, ckpt, int(config["vocab_size"]))
        for gguf_name, data, ggml_type in payloads:
            if ggml_type in (T.F32, T.F16):
                writer.add_tensor(gguf_name, data)
            else:
                writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    fallbacks = [f"{r.gguf_name}: {r.reason}" for r in records if r.fallback]
    reasons: dict[str, int] = {}
    for r in records:
        if r.fallback:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    for reason, count in reasons.items():
        log.warning("%d tensors: %s (exact; recorded in paretoq.fallbacks)", count, reason)
    return GGUFExportResult(
        path=output, tensor_types={r.gguf_name: r.ggml_type for r in records}, nbytes=output.stat().st_size,
        fallbacks=fallbacks, lossy=[r.gguf_name for r in records if r.lossy], file_type=file_type.name,
        seconds=time.perf_counter() - t0, records=records,
    )


def _tensor_items(ckpt) -> list[str]:
    names = list(ckpt.tensors) + list(ckpt.quantized)
    if ckpt.tied:
        names = [n for n in names if n != "lm_head.weight"]  # llama.cpp reuses token_embd without output.weight

    def key(n: str):
        m = re.search(r"\.layers\.(\d+)\.", n)
        return (0 if "embed_tokens" in n else 1 if m else 2, int(m.group(1)) if m else 0, n)

    return sorted(names, key=key)


def _encode_tensor(ckpt, hf_name, gguf_name, config, permute, options) -> tuple[TensorRecord, np.ndarray, T]:
    q = ckpt.quantized.get(hf_name)
    if q is not None:
        codes = q.codes.numpy()
        step = q.scale.numpy().astype(np.float16)
        perm = _row_permutation(hf_name, codes.shape[0], config, permute)
        if perm is not None:  # rows move with their steps, so exactness is untouched
            codes, step = codes[perm], step[perm]
        choice = choose_tensor_type(gguf_name, q.grid, codes.shape, options, hf_name=hf_name, codes=codes, step=step)
        if choice.lossy:
            data = gguf.quants.quantize(dequantize_codes(codes, step, q.grid), choice.ggml_type)
        else:
            data = encoder_for(choice.ggml_type).encode(codes, step, q.grid)
            if choice.ggml_type in (T.F32, T.F16):  # the writer takes float arrays for float types
                data = data.view(np.float32 if choice.ggml_type == T.F32 else np.float16)
        rec = TensorRecord(hf_name, gguf_name, choice.ggml_type.name, tuple(codes.shape), data.nbytes, q.grid.name,
                           q.grid.bits, choice.reason, choice.fallback, choice.lossy)
        return rec, data, choice.ggml_type
    tensor = ckpt.tensors[hf_name]
    values = tensor.float().numpy()
    perm = _row_permutation(hf_name, values.shape[0], config, permute)
    if perm is not None:
        values = values[perm]
    choice = choose_tensor_type(gguf_name, None, values.shape, options, hf_name=hf_name, values=values)
    if choice.ggml_type == T.F32:
        data = np.ascontiguousarray(values, dtype=np.float32)
    elif choice.ggml_type == T.F16:
        data = values.astype(np.float16)
    else:
        data = gguf.quants.quantize(values, choice.ggml_type)
    rec = TensorRecord(hf_name, gguf_name, choice.ggml_type.name, tuple(values.shape), data.nbytes, None, None,
                       choice.reason, choice.fallback, choice.lossy)
    return rec, data, choice.ggml_type


def _extra_tensors(config: dict, model_type: str, name_map) -> list[tuple[str, np.ndarray, T]]:
    rope = _rope_params(config)
    if model_type != "llama" or str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    base, dim = rope.get("rope_theta", 10000.0), _head_dim(config)  # as convert_hf_to_gguf generate_extra_tensors
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [(name, np.array(out, dtype=np.float32), T.F32)]


def _file_type(records: list[TensorRecord]) -> gguf.LlamaFileType:
    weights: dict[str, int] = {}
    for r in records:
        if r.grid is not None:
            weights[r.ggml_type] = weights.get(r.ggml_type, 0) + int(np.prod(r.shape))
    if not weights:
        return gguf.LlamaFileType.MOSTLY_F16
    return _FILE_TYPES.get(T[max(weights, key=weights.get)], gguf.LlamaFileType.GUESSED)


def _add_metadata(writer, ckpt, config, model_type, options, records, file_type) -> None:
    base_model = _base_model(ckpt, options)
    basename = _basename(ckpt, options)
    bits = sorted({r.bits for r in records if r.bits is not None})
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(options.name or f"{basename} ParetoQ {'/'.join(format_bits(b) for b in bits)}-bit")
    writer.add_basename(basename)
    writer.add_size_label(gguf.size_label(_n_params(ckpt), 0, 0, 0))
    writer.add_quantized_by(QUANTIZED_BY)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    license_ = options.license or ckpt.recipe.get("license")
    if not license_ and base_model:
        from paretoq_export.model_source import known_license

        license_ = known_license(base_model)
    if license_:
        writer.add_license(license_)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model.split("/")[-1])
        if "/" in base_model:
            writer.add_base_model_organization(0, base_model.split("/")[0])
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")

    # hyper-parameters, as convert_hf_to_gguf's TextModel / LlamaModel / Qwen2Model / Qwen3Model write them
    n_head = int(config["num_attention_heads"])
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = _rope_params(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type, factor = str(rope.get("rope_type") or "default").lower(), rope.get("factor")
    if rope_type == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise GGUFExportError(f"rope type {rope_type!r} is not supported by the GGUF exporter (default, linear, "
                              "yarn, llama3)")
    head_dim = _head_dim(config)
    if model_type == "llama":
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
    if config.get("head_dim") and (model_type == "qwen3" or head_dim != int(config["hidden_size"]) // n_head):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    # paretoq.* : what each tensor holds and how it was made
    writer.add_string("paretoq.version", PARETOQ_VERSION)
    writer.add_string("paretoq.recipe", json.dumps(ckpt.recipe, sort_keys=True, default=str))
    writer.add_string("paretoq.canonical_form", "w = s * (q - z), s fp16 per output row, evaluated in float32")
    quant = [r for r in records if r.grid is not None]
    writer.add_array("paretoq.quantized_tensors", [r.gguf_name for r in quant] or [""])
    writer.add_array("paretoq.tensor_bits", [float(r.bits) for r in quant] or [0.0])
    writer.add_array("paretoq.tensor_grids", [r.grid for r in quant] or [""])
    writer.add_array("paretoq.tensor_types", [r.ggml_type for r in quant] or [""])
    writer.add_array("paretoq.fallbacks", [f"{r.gguf_name}: {r.reason}" for r in records if r.fallback] or [""])
    writer.add_array("paretoq.lossy_tensors", [r.gguf_name for r in records if r.lossy] or [""])
    writer.add_bool("paretoq.exact", not any(r.lossy for r in records))


# ----------------------------------------------------------------------------------------------- tokenizer
def _add_tokenizer(writer, ckpt, vocab_size: int) -> None:
    files = ckpt.tokenizer_files
    if not files:
        log.warning("the checkpoint has no tokenizer files: writing tokenizer.ggml.model 'none'")
        writer.add_tokenizer_model("none")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        spm = "tokenizer.model" in files and not _is_byte_level(files.get("tokenizer.json"))
        if spm:
            vocab = gguf.vocab.SentencePieceVocab(tmp_path)
            tokens, scores, types = [], [], []
            for text, score, typ in vocab.all_tokens():
                tokens.append(text), scores.append(score), types.append(typ)
            tokens, scores, types = tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]
            for i in range(len(tokens), vocab_size):
                tokens.append(f"[PAD{i}]".encode()), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tmp_path, load_merges=False, n_vocab=vocab_size)
        else:
            tokens, types, pre = _bpe_vocab(tmp_path, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(tmp_path, load_merges=True, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)


def _is_byte_level(tokenizer_json: bytes | None) -> bool:
    return tokenizer_json is not None and b'"ByteLevel"' in tokenizer_json


def _bpe_vocab(path: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """As convert_hf_to_gguf's get_vocab_base (gpt2 tokenizer model): tokens by id, padded with [PADi]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                              f"{vocab_size}: tokenizer and model do not match")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if i in decoder and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = (i in decoder and decoder[i].special) or (token.startswith("<") and token.endswith(">"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, _pretokenizer(tokenizer)


_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
    "it, 'D you like some tea? We'Ve a'lL"
)


def _pretokenizer(tokenizer) -> str:
    """tokenizer.ggml.pre as convert_hf_to_gguf detects it: sha256 of the token ids of a fixed text."""
    digest = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    name = _PRETOKENIZER_HASHES.get(digest)
    if name is None:
        log.warning("unknown BPE pre-tokenizer (hash %s...): writing tokenizer.ggml.pre 'default'", digest[:12])
        return "default"
    return name


# ----------------------------------------------------------------------------------------------- validation
class ReadbackMismatch(ValueError):
    """A tensor read back from the GGUF differs from the checkpoint."""


def expected_tensors(ckpt) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values the file must hold: the checkpoint's dequantized tensors, Q/K rows permuted."""
    model_type, arch, permute = _arch(ckpt.config)
    name_map = gguf.get_tensor_name_map(arch, int(ckpt.config["num_hidden_layers"]))
    out = {}
    for hf_name in _tensor_items(ckpt):
        if hf_name in ckpt.quantized:
            q = ckpt.quantized[hf_name]
            values = dequantize_codes(q.codes.numpy(), q.scale.numpy(), q.grid)
        else:
            values = ckpt.tensors[hf_name].float().numpy()
        perm = _row_permutation(hf_name, values.shape[0], ckpt.config, permute)
        out[name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = values[perm] if perm is not None else values
    return out


def verify_gguf_readback(gguf_path: str | os.PathLike, checkpoint) -> dict:
    """Dequantize every tensor with gguf-py and compare with the checkpoint (exact float32 equality, -0 == +0).

    Tensors the export recorded as lossy are compared, not required equal. Raises ReadbackMismatch naming the
    first tensor that differs."""
    ckpt, _ = _load(checkpoint)
    expected = expected_tensors(ckpt)
    reader = gguf.GGUFReader(str(gguf_path))
    lossy = set(_string_array(reader, "paretoq.lossy_tensors"))
    seen, exact, lossy_err = set(), 0, {}
    for tensor in reader.tensors:
        if tensor.name not in expected:
            if tensor.name.startswith("rope_freqs"):
                continue
            raise ReadbackMismatch(f"{gguf_path}: unexpected tensor {tensor.name}")
        want = expected[tensor.name]
        got = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32, copy=False)
        got = got.reshape(want.shape)
        seen.add(tensor.name)
        if tensor.name in lossy:
            lossy_err[tensor.name] = float(np.abs(got - want).max())
            continue
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[0]
            raise ReadbackMismatch(
                f"{tensor.name} ({tensor.tensor_type.name}) differs from the checkpoint at {tuple(int(i) for i in bad)}: "
                f"{float(got[tuple(bad)])!r} != {float(want[tuple(bad)])!r}")
        exact += 1
    missing = set(expected) - seen
    if missing:
        raise ReadbackMismatch(f"{gguf_path} lacks tensors {sorted(missing)[:3]}")
    return {"tensors": len(seen), "exact": exact, "lossy": lossy_err, "bit_exact": not lossy_err}


def _string_array(reader, key: str) -> list[str]:
    field_ = reader.get_field(key)
    if field_ is None:
        return []
    return [s for s in (bytes(field_.parts[i]).decode() for i in field_.data) if s]


def validate_gguf(gguf_path: str | os.PathLike, checkpoint, token_ids: Sequence[int] | np.ndarray,
                  n_threads: int = 2, margin: float | None = None, json_path: str | os.PathLike | None = None) -> dict:
    """Read-back exactness + llama.cpp logits vs the PyTorch reference on ``token_ids`` (one sequence).

    Writes the result as JSON next to the file (``<file>.validation.json``) and returns it."""
    import torch

    from runtime_tests.llamacpp import LlamaCppRunner
    from runtime_tests.metrics import compare_logits

    ckpt, _ = _load(checkpoint)
    readback = verify_gguf_readback(gguf_path, ckpt)
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    model = ckpt.build_reference_model()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).unsqueeze(0)).logits[0].double().numpy()
    del model
    runner = LlamaCppRunner(gguf_path, n_threads=n_threads, n_ctx=max(64, len(ids)))
    try:
        test = runner.logits(ids.tolist())
    finally:
        runner.close()
    metrics = compare_logits(ref[:-1], test[:-1], ids[1:], margin=margin)
    result = {"gguf": str(gguf_path), "tokens": int(len(ids)), "threads": n_threads, "readback": readback,
              "llamacpp_vs_reference": metrics}
    json_path = Path(json_path) if json_path else Path(str(gguf_path) + ".validation.json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(json_path)
    return result


# convert_hf_to_gguf's tokenizer.ggml.pre detection table (sha256 of the chktxt token ids -> name), copied from
# the vendored llama.cpp of llama-cpp-python 0.3.36 (conversion/base.py, get_vocab_base_pre).
_PRETOKENIZER_HASHES = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "bert-bge",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}
