"""Exact ggml block encoders: integer codes + fp16 steps (per row, or per group of G columns) -> raw GGUF blocks.

One small class per ggml type, vectorised numpy, registered by type (the shape of gguf-py's ``quants.py``).
Unlike gguf-py's quantizers, nothing here re-derives a scale from float weights: every block scale is the
checkpoint step s of the row or group the block lies in (or s/2 for grids with a half-integer zero), and every
stored integer is a checkpoint code shifted by a constant, so ``gguf.quants.dequantize`` of the bytes reproduces
``s * (q - z)`` in float32 bit for bit. A block holds one step: per-row steps and groups of a multiple of the block
repeat it in every block (Q4_0 holds G = 32, 64, 128, 256); groups smaller than the block fit only where the
block's groups happen to share one step (checked, never assumed).

Block layouts follow ggml-common.h / gguf-py quants.py (vendored llama.cpp of llama-cpp-python 0.3.36):

    Q4_0  [d f16][qs 16: lo nibble = x[j], hi nibble = x[j+16]]                      y = d*(c-8)
    Q8_0  [d f16][qs 32 int8]                                                           y = d*c
    TQ2_0 [qs 64: byte (h*32+l) holds x[h*128 + k*32 + l] at bits 2k][d f16]             y = d*(t-1)
    TQ1_0 [qs 48: base-3, 5 trits/byte][qh 4: 4 trits/byte][d f16]                      y = d*(t-1)
    Q2_K  [scales 16: (m<<4)|sc][qs 64: as TQ2_0][d f16][dmin f16]                       y = d*sc*q - dmin*m
    Q3_K  [hmask 32: bit b of byte l = x[b*32+l] >= 0][qs 64: low 2 bits as Q2_K][scales 12: 6-bit][d f16]
                                                                                         y = d*(sc-32)*q, q in -4..3
    Q2_0  [d f16][qs 16: x[j] at bits 2*(j%4) of byte j/4], block 64                     y = d*(t-1)
    Q1_0  [d f16][qs 16: x[j] at bit j%8 of byte j/8], block 128                         y = bit ? d : -d

gguf-py (0.19) has no dequantizer for Q2_0 and Q1_0, so their decoders are ours (ggml-quants.c
dequantize_row_q2_0 / q1_0, in numpy); nor has it the type Q2_0 at all, whose id comes from the installed llama.cpp
(runtime_tests.llamacpp_types).
"""

from __future__ import annotations

from typing import ClassVar, Union

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from paretoq_export.canonical.grids import Grid, integer_form
from runtime_tests import llamacpp_types
from runtime_tests.llamacpp_types import LlamaCppOnlyType

GGMLType = Union[GGMLQuantizationType, LlamaCppOnlyType]  # a gguf-py type, or one only llama.cpp has (Q2_0)

QK_K = 256


class NotExactError(ValueError):
    """The container cannot hold this tensor's grid values exactly."""


def scaled_step(step: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """fp16 step * factor rounded to fp16, and per-row flags saying whether that rounding was exact."""
    s32 = np.asarray(step, dtype=np.float16).astype(np.float32)
    want = s32 * np.float32(factor)  # exact in f32 for factors 1/2, 3/2 ...
    d = want.astype(np.float16)
    return d, d.astype(np.float32) == want


def block_steps(step: np.ndarray, cols: int, block_size: int) -> tuple[np.ndarray, str | None]:
    """The one fp16 step of every block [rows, cols // block_size] from steps per row [rows] or per group
    [rows, cols // G], and None; or a reason when some block spans groups with different steps."""
    step = np.asarray(step, dtype=np.float16)
    if step.ndim == 1:
        step = step.reshape(-1, 1)
    rows, n_groups = step.shape
    nb = cols // block_size
    group = cols // n_groups
    if group % block_size == 0:
        return np.repeat(step, group // block_size, axis=1), None
    per_block = step.reshape(rows, nb, block_size // group)  # block_size is a multiple of the (power-of-two) group
    same = (per_block == per_block[:, :, :1]).all(axis=2)
    if not same.all():
        r, b = np.argwhere(~same)[0]
        return per_block[:, :, 0], (f"group size {group} has no exact {block_size}-block container (block {b} of row "
                                    f"{r} spans steps that differ): use group size {block_size}, or Q4_0 / Q8_0 "
                                    "(one step per 32)")
    return per_block[:, :, 0], None


ENCODERS: dict[GGMLType, "BlockEncoder"] = {}  # filled as each encoder class is defined


class BlockEncoder:
    ggml_type: ClassVar[GGMLType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, ggml_type: GGMLType | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if ggml_type is not None:
            cls.ggml_type = ggml_type
            if isinstance(ggml_type, LlamaCppOnlyType):
                cls.block_size, cls.type_size = ggml_type.block_size, ggml_type.type_size
            else:
                cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
            ENCODERS[ggml_type] = cls()

    @property
    def name(self) -> str:
        return self.ggml_type.name

    def holds(self, grid: Grid) -> bool:
        """Whether every value of the grid is representable (block-scale exactness is checked per tensor)."""
        raise NotImplementedError

    def why_not_exact(self, codes: np.ndarray, step: np.ndarray, grid: Grid) -> str | None:
        """None if ``encode`` is exact for this tensor, else a short reason."""
        if codes.shape[-1] % self.block_size:
            return f"{codes.shape[-1]} columns are not a multiple of the {self.name} block ({self.block_size})"
        if not self.holds(grid):
            return f"{self.name} cannot represent the {grid.name} grid's levels"
        steps, reason = block_steps(step, codes.shape[-1], self.block_size)
        return reason or self._why_not_exact_steps(steps.reshape(-1), grid)

    def _why_not_exact_steps(self, step: np.ndarray, grid: Grid) -> str | None:
        """``step``: one fp16 step per block, flat."""
        return None

    def encode(self, codes: np.ndarray, step: np.ndarray, grid: Grid) -> np.ndarray:
        """uint8 codes [rows, cols] + fp16 steps [rows] or [rows, cols // G] -> uint8 [rows, cols // block_size *
        type_size]."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        reason = self.why_not_exact(codes, step, grid)
        if reason is not None:
            raise NotExactError(reason)
        rows, cols = codes.shape
        nb = cols // self.block_size
        steps, _ = block_steps(step, cols, self.block_size)
        blocks = self._encode_blocks(codes.reshape(rows * nb, self.block_size), steps.reshape(-1), grid)
        assert blocks.shape == (rows * nb, self.type_size) and blocks.dtype == np.uint8
        return blocks.reshape(rows, nb * self.type_size)

    def _encode_blocks(self, codes: np.ndarray, step: np.ndarray, grid: Grid) -> np.ndarray:
        raise NotImplementedError


class _SymmetricEncoder(BlockEncoder):
    """Types storing y = d * k with k a signed integer in [k_min, k_max] and one fp16 d per block."""

    k_min: ClassVar[int]
    k_max: ClassVar[int]

    def holds(self, grid: Grid) -> bool:
        form = integer_form(grid)
        return self.k_min <= form.low and form.high <= self.k_max

    def _why_not_exact_steps(self, step: np.ndarray, grid: Grid) -> str | None:
        if integer_form(grid).mult == 1:
            return None  # d = s, already fp16
        _, exact = scaled_step(step, 0.5)
        if not exact.all():
            block = int(np.flatnonzero(~exact)[0])
            return f"step/2 of block {block} ({float(step[block])!r}) is not an exact fp16 (subnormal)"
        return None

    def _encode_blocks(self, codes: np.ndarray, step: np.ndarray, grid: Grid) -> np.ndarray:
        form = integer_form(grid)
        k = form.integers(codes.astype(np.int16), grid.zero).astype(np.int16)
        d, _ = scaled_step(step, 1.0 / form.mult)
        return self._pack(k, d)

    def _pack(self, k: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _d_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _pack_2bit_qk(u: np.ndarray) -> np.ndarray:
    """256 2-bit values per block -> 64 bytes: byte h*32+l holds value h*128 + j*32 + l at bits 2j."""
    n = u.shape[0]
    u = u.astype(np.uint8).reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(u, axis=2).reshape(n, 64)


class Q4_0(_SymmetricEncoder, ggml_type=GGMLQuantizationType.Q4_0):
    k_min, k_max = -8, 7

    def _pack(self, k, d):
        c = (k + 8).astype(np.uint8)
        qs = c[:, :16] | (c[:, 16:] << np.uint8(4))
        return np.concatenate([_d_bytes(d), qs], axis=1)


class Q8_0(_SymmetricEncoder, ggml_type=GGMLQuantizationType.Q8_0):
    k_min, k_max = -128, 127

    def _pack(self, k, d):
        return np.concatenate([_d_bytes(d), k.astype(np.int8).view(np.uint8)], axis=1)


class TQ2_0(_SymmetricEncoder, ggml_type=GGMLQuantizationType.TQ2_0):
    k_min, k_max = -1, 1  # the format stores t-1 up to 2, but ternary/binary use -1..1 only

    def _pack(self, k, d):
        return np.concatenate([_pack_2bit_qk(k + 1), _d_bytes(d)], axis=1)


class TQ1_0(_SymmetricEncoder, ggml_type=GGMLQuantizationType.TQ1_0):
    k_min, k_max = -1, 1

    def _pack(self, k, d):
        n = k.shape[0]
        t = (k + 1).astype(np.uint16)
        # first 160 values: 32 bytes of 5 trits (trit i of byte l is value i*32+l), next 80: 16 bytes of 5,
        # last 16: 4 bytes of 4 trits; most significant trit first, then scaled to a byte (ceil(v*256/243))
        w5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16).reshape(1, 5, 1)
        qs0 = (t[:, :160].reshape(n, 5, 32) * w5).sum(axis=1)
        qs1 = (t[:, 160:240].reshape(n, 5, 16) * w5).sum(axis=1)
        qh = (t[:, 240:].reshape(n, 4, 4) * np.array([81, 27, 9, 3], dtype=np.uint16).reshape(1, 4, 1)).sum(axis=1)
        v = np.concatenate([qs0, qs1, qh], axis=1)
        q = ((v * 256 + 242) // 243).astype(np.uint8)
        return np.concatenate([q, _d_bytes(d)], axis=1)


class Q3_K(_SymmetricEncoder, ggml_type=GGMLQuantizationType.Q3_K):
    """All 16 sub-block scales are 33 (6-bit, minus 32 = 1), d is the row step: y = d * q, q in -4..3."""

    k_min, k_max = -4, 3
    # scale 33 = 0b10_0001: low nibbles 1 in bytes 0..7 (two scales each), high 2 bits 2 in bytes 8..11
    _SCALES = np.array([0x11] * 8 + [0xAA] * 4, dtype=np.uint8)

    def _pack(self, k, d):
        n = k.shape[0]
        u = (k + 4).astype(np.uint8)  # q = (u & 3) - (hbit ? 0 : 4)
        hbit = (u >> np.uint8(2)).reshape(n, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        hmask = np.bitwise_or.reduce(hbit, axis=1)
        qs = _pack_2bit_qk(u & np.uint8(3))
        return np.concatenate([hmask, qs, np.broadcast_to(self._SCALES, (n, 12)), _d_bytes(d)], axis=1)


class _LowBitEncoder(_SymmetricEncoder):
    """[d f16][qs: weight j at bits (j % per_byte) * bits of byte j // per_byte], y = d * LEVELS[stored]: Q2_0 and
    Q1_0, where a grid fits when each of its integers is a level (Q1_0 has no zero: binary only)."""

    bits: ClassVar[int]
    levels: ClassVar[tuple[int, ...]]  # the integer each stored value stands for, ascending

    def holds(self, grid: Grid) -> bool:
        form = integer_form(grid)
        return set(range(form.low, form.high + 1, form.mult)) <= set(self.levels)

    def _shifts(self) -> np.ndarray:
        return np.arange(0, 8, self.bits, dtype=np.uint8)

    def _pack(self, k, d):
        stored = np.searchsorted(np.array(self.levels), k).astype(np.uint8)
        stored = stored.reshape(k.shape[0], -1, 8 // self.bits) << self._shifts()
        return np.concatenate([_d_bytes(d), np.bitwise_or.reduce(stored, axis=2)], axis=1)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """Raw blocks uint8 [..., n * type_size] -> float32 [..., n * block_size], as ggml's dequantize_row."""
        blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, self.type_size)
        d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)
        stored = (blocks[:, 2:, None] >> self._shifts()) & np.uint8((1 << self.bits) - 1)
        k = np.array(self.levels, dtype=np.float32)[stored.reshape(len(blocks), self.block_size)]
        return (d * k).reshape(*np.shape(raw)[:-1], -1)


class Q2_0(_LowBitEncoder, ggml_type=llamacpp_types.Q2_0):
    bits, levels = 2, (-1, 0, 1, 2)  # stored 0..3 = t, y = d*(t-1); ternary d = step, binary d = step/2


class Q1_0(_LowBitEncoder, ggml_type=GGMLQuantizationType.Q1_0):
    bits, levels = 1, (-1, 1)  # binary: d = step/2


class Q2_K(BlockEncoder, ggml_type=GGMLQuantizationType.Q2_K):
    """y = d*sc*q - dmin*m with q the raw code: d = s, sc = 1, and dmin*m = s*z (dmin = s/2, m = 2z for
    half-integer zeros, e.g. 2-bit SEQ: dmin = s/2, m = 3; dmin = s, m = z otherwise)."""

    def holds(self, grid: Grid) -> bool:
        return grid.n_codes <= 4 and self._mins(grid)[1] <= 15

    @staticmethod
    def _mins(grid: Grid) -> tuple[float, int]:
        mult = integer_form(grid).mult
        return 1.0 / mult, int(round(grid.zero * mult))

    def _why_not_exact_steps(self, step, grid):
        factor, _ = self._mins(grid)
        _, exact = scaled_step(step, factor)
        if not exact.all():
            block = int(np.flatnonzero(~exact)[0])
            return f"step*{factor} of block {block} ({float(step[block])!r}) is not an exact fp16 (subnormal)"
        return None

    def _encode_blocks(self, codes, step, grid):
        n = codes.shape[0]
        factor, m = self._mins(grid)
        dmin, _ = scaled_step(step, factor)
        scales = np.full((n, 16), (m << 4) | 1, dtype=np.uint8)
        return np.concatenate([scales, _pack_2bit_qk(codes), _d_bytes(step), _d_bytes(dmin)], axis=1)


class _FloatEncoder(BlockEncoder):
    """F32 holds every grid (an fp16 step times a small half-integer fits f32); F16 only when the values do."""

    dtype: ClassVar[type]

    def holds(self, grid: Grid) -> bool:
        return self.dtype is np.float32

    def why_not_exact(self, codes, step, grid):
        if self.dtype is np.float32:
            return None
        w = dequantize_codes(codes, step, grid)
        if not np.array_equal(w.astype(self.dtype).astype(np.float32), w):
            return f"{self.name} cannot hold s * (q - z) exactly for the {grid.name} grid here"
        return None

    def encode(self, codes, step, grid):
        reason = self.why_not_exact(codes, step, grid)
        if reason is not None:
            raise NotExactError(reason)
        values = np.ascontiguousarray(dequantize_codes(codes, step, grid).astype(self.dtype))
        return values.view(np.uint8)  # raw little-endian bytes, like the block types


class F32(_FloatEncoder, ggml_type=GGMLQuantizationType.F32):
    dtype = np.float32


class F16(_FloatEncoder, ggml_type=GGMLQuantizationType.F16):
    dtype = np.float16


def dequantize_codes(codes: np.ndarray, step: np.ndarray, grid: Grid) -> np.ndarray:
    """The canonical w = s * (q - z) in float32, in numpy (same arithmetic as the checkpoint's dequantize_codes),
    steps per row [rows] or per group [rows, cols // G]."""
    s = np.asarray(step, dtype=np.float16).astype(np.float32)
    s = s.reshape(-1, 1) if s.ndim == 1 else np.repeat(s, codes.shape[-1] // s.shape[1], axis=1)
    return s * (codes.astype(np.float32) - np.float32(grid.zero))


def dequantize_blocks(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """The values raw tensor data of any written type holds: gguf-py's dequantizer, or ours where it has none."""
    encoder = ENCODERS.get(ggml_type)
    if isinstance(encoder, _LowBitEncoder):
        return encoder.decode(raw)
    return gguf.quants.dequantize(raw, ggml_type)


def encoder_for(ggml_type: GGMLType | str) -> BlockEncoder:
    name = ggml_type.upper() if isinstance(ggml_type, str) else ggml_type.name
    for encoder in ENCODERS.values():
        if encoder.name == name:
            return encoder
    raise NotExactError(f"no exact encoder for {name}: choose one of {', '.join(supported_types())}")


def supported_types() -> list[str]:
    return [t.name for t in ENCODERS]
