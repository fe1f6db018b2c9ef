"""Which ggml type holds each tensor of a GGUF export: the grid's exact container (fallbacks where a row does not
fit the block), --tensor-type overrides refused unless exact or --allow-lossy; and the export options that steer
the choice."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from formats.gguf_blocks import ENCODERS, QK_K, GGMLType
from formats.protocol import StoragePlacement
from paretoq_export.canonical.grids import Grid, format_bits
from runtime_tests.llamacpp_types import LLAMA_CPP_ONLY_TYPES


# preferred container per grid (ternary/binary follow --ternary-type); fallbacks when a row does not fit
_PREFERRED = {"seq2": T.Q2_K, "lsq3": T.Q3_K, "lsq4": T.Q4_0, "lsq8": T.Q8_0}


_FALLBACKS = (T.Q4_0, T.Q8_0, T.F32)


# --ternary-type: the 256-block containers of ternary and binary rows; --ternary-fallback: the first container tried
# for the rows they do not hold (then _FALLBACKS). Q2_0 is smaller than Q4_0 but x86 llama.cpp has only its scalar
# kernel (docs/BENCHMARKS.md), so it is a size option for Arm builds, not the default.
TERNARY_TYPES = ("TQ2_0", "TQ1_0")
TERNARY_FALLBACKS = ("Q4_0", "Q2_0")


# lossy types gguf-py can quantize floats into (embedding/output size options, --allow-lossy overrides)
_LOSSY_OK = {T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0}


class GGUFExportError(ValueError):
    """A GGUF export the user can fix; the message is one line naming the problem and the fix."""


@dataclass
class GGUFOptions:
    ternary_type: str = "TQ2_0"  # container for ternary and binary grids: TQ2_0 (fast) or TQ1_0 (small)
    ternary_fallback: str = "Q4_0"  # ternary/binary rows the ternary type does not hold: Q4_0, or Q2_0 (smaller)
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
    group_size: int | None = None  # columns per checkpoint step (the row length for per-row steps)


class TypeChoice(NamedTuple):
    ggml_type: GGMLType
    reason: str
    fallback: bool = False
    lossy: bool = False


def parse_type(name: str, what: str = "type", instead: str | None = None) -> GGMLType:
    """A ggml type by name. A type gguf-py lacks (Q2_0) only where the installed llama.cpp has it, else the
    error names the upgrade or ``instead``."""
    key = str(name).strip().upper()
    if key in LLAMA_CPP_ONLY_TYPES:
        ggml_type = LLAMA_CPP_ONLY_TYPES[key]
        missing = ggml_type.missing()
        if missing:
            raise GGUFExportError(f"{missing}: upgrade llama-cpp-python, or use {instead or 'another ' + what}")
        return ggml_type
    try:
        return T[key]
    except KeyError:
        known = sorted({t.name for t in ENCODERS} | {t.name for t in _LOSSY_OK})
        raise GGUFExportError(f"unknown GGUF {what} {name!r}: use one of {', '.join(known)}") from None


def ternary_containers(options: GGUFOptions) -> tuple[GGMLType, GGMLType]:
    """--ternary-type and --ternary-fallback, checked: the container of ternary and binary rows, and the one their
    rows go to first where it does not fit (before Q4_0)."""
    preferred = parse_type(options.ternary_type, "--ternary-type")
    if preferred.name not in TERNARY_TYPES:
        raise GGUFExportError(f"--ternary-type must be {' or '.join(TERNARY_TYPES)}, not {preferred.name}")
    fallback = parse_type(options.ternary_fallback, "--ternary-fallback", instead="--ternary-fallback Q4_0")
    if fallback.name not in TERNARY_FALLBACKS:
        raise GGUFExportError(f"--ternary-fallback must be {' or '.join(TERNARY_FALLBACKS)}, not {fallback.name}")
    return preferred, fallback


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


def _requested_type(gguf_name: str, hf_name: str, options: GGUFOptions) -> tuple[GGMLType | None, str]:
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

    fallbacks = _FALLBACKS
    if grid.name in ("ternary", "binary"):
        preferred, first_fallback = ternary_containers(options)
        fallbacks = tuple(dict.fromkeys((first_fallback, *_FALLBACKS)))
    else:
        preferred = _PREFERRED[grid.name]
    first_reason = _why_not(preferred, codes, step, grid, cols)
    if first_reason is None:
        return TypeChoice(preferred, f"{grid.name} grid")
    for candidate in fallbacks:
        if _why_not(candidate, codes, step, grid, cols) is None:
            return TypeChoice(candidate, f"fallback {preferred.name} -> {candidate.name}: {first_reason}", fallback=True)
    raise AssertionError("F32 holds every grid")


def _why_not(ggml_type: GGMLType, codes, step, grid: Grid, cols: int) -> str | None:
    if ggml_type not in ENCODERS:
        return f"no exact encoder for {ggml_type.name}"
    enc = ENCODERS[ggml_type]
    if codes is None:
        if cols % enc.block_size:
            return f"{cols} columns are not a multiple of the {ggml_type.name} block ({enc.block_size})"
        return None if enc.holds(grid) else f"{ggml_type.name} cannot represent the {grid.name} grid's levels"
    return enc.why_not_exact(codes, step, grid)


# ------------------------------------------------------------------------------------------------ storage plan
def _placement(t: T, bits: float, group_size: int | None) -> StoragePlacement:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return StoragePlacement(bits, group_size, t.name, 8.0 * size / block)


def gguf_storage(row_length: int, bits: float, group_size: int | None, table: bool = False) -> StoragePlacement:
    """The type a weight of this grid width and group size lands in (the writer's default choice above) and the
    bits per weight it stores: one step per block, so the 256-block types take per-row or per-256 steps of rows
    of a multiple of 256, and Q4_0 / Q8_0 every other group (the step repeated in each 32-block)."""
    group = group_size or row_length
    if bits >= 8:
        return _placement(T.Q8_0, bits, group_size)
    if not table and bits < 4 and group % QK_K == 0 and row_length % QK_K == 0:
        return _placement(T.TQ2_0 if bits < 2 else T.Q2_K if bits == 2 else T.Q3_K, bits, group_size)
    return _placement(T.Q4_0, bits, group_size)


def gguf_storage_plan(row_length: int, bits: float, table: bool = False) -> StoragePlacement:
    """Rows of a multiple of 256 at 1 / 1.58 / 2 / 3 bits: TQ2_0 / Q2_K / Q3_K with their d per 256 (G = 256).
    Everything else lands in Q4_0, whose 4.5 bits per weight hold a 4-bit grid with its own step per 32, so it
    trains as that (G = 32); tables: Q8_0 (8-bit) or Q4_0, G = 32."""
    if table or bits >= 8:
        return gguf_storage(row_length, bits, 32, table)
    if row_length % QK_K == 0 and bits < 4:
        return gguf_storage(row_length, bits, QK_K)
    return gguf_storage(row_length, 4.0, 32)
