"""com.microsoft MatMulNBits initializers built from the canonical checkpoint's integer codes and fp16 steps.

MatMulNBits computes ``Y = A @ W^T`` with ``W[n, k] = scales[n, k // block] * (B[n, k] - zero_points[n, k // block])``
(B packed low bits first along K, ``bits`` in {2, 4, 8}, zero point default ``2^(bits-1)``). Every ParetoQ grid
``w = s * (q - z)`` maps onto it exactly (DESIGN.md section 3), as ``NBitsEncoding`` says:

    container code = mul * q + add,   scale = s / mul (float32: exact for any fp16 s),   zero point = add + mul * z

so ``scale * (code - zp) = s * (q - z)``. The per-row step is replicated across the row's K blocks; ``block_size`` is
only a speed/size choice. Whether the zero point is the op's default (no input), or a float input, matters to
onnxruntime 1.32's CPU kernels [measured, M=1, 576x1536, 1 thread]: 2-bit with integer zero points runs int8 kernels
at accuracy_level 4 (~0.08 ms/matmul) but a very slow float path at level 0 (~4.5 ms); 2-bit with a float zero point
always runs a float path (~0.45 ms) whatever the level; 4-bit with integer zero points is fast at both levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paretoq_export.canonical.grids import Grid, integer_form
from paretoq_export.canonical.packing import pack_codes as pack_row_codes

SUPPORTED_BITS = (2, 4, 8)
MIN_BLOCK, MAX_BLOCK = 16, 128


class NBitsError(ValueError):
    """A grid or shape that MatMulNBits cannot hold as asked; one line naming the problem and the fix."""


@dataclass(frozen=True)
class NBitsEncoding:
    bits: int  # MatMulNBits ``bits``
    mul: int  # container code = mul * q + add
    add: int
    zero_point: float | None  # None: the op's default 2^(bits-1) (no zero_points input); else a float input

    @property
    def kind(self) -> str:
        return f"int{self.bits}" + ("-float-zp" if self.zero_point is not None else "")


def _integer_encoding(grid: Grid, bits: int) -> NBitsEncoding | None:
    """The default-zero-point encoding of ``grid`` in ``bits``, if its integer form fits: container code =
    k + 2^(bits-1) with k = mult * (q - z) (canonical.grids.integer_form)."""
    form = integer_form(grid)
    if not form.fits_signed(bits):
        return None
    return NBitsEncoding(bits, form.mult, 2 ** (bits - 1) + form.low, None)


def choose_encoding(grid: Grid, accuracy_level: int, seq2_bits: int = 2) -> NBitsEncoding:
    """The exact MatMulNBits encoding for ``grid``.

    Grids of <= 4 levels (binary, ternary, 2-bit SEQ) go in bits=2: with a float zero point (= the grid's z) at
    accuracy_level 0, where onnxruntime's float path for it is ~10x faster than for integer zero points, and with
    the default integer zero point at level 4 (int8 kernels) -- except 2-bit SEQ, whose levels +-0.5, +-1.5 need the
    float zero point 1.5 (``seq2_bits=4`` stores it instead as bits=4 codes 2q+5, step s/2: twice the size, int8
    kernels). 3/4-bit LSQ go in bits=4, the 8-bit embedding/lm_head grid in bits=8, both with default zero points.
    """
    if accuracy_level not in (0, 4):
        raise NBitsError(f"accuracy level {accuracy_level} is not supported: use 0 (float activations, exact) or 4 "
                         "(int8 activations, fast)")
    if seq2_bits not in (2, 4):
        raise NBitsError(f"--seq2-bits {seq2_bits}: use 2 (bits=2, float zero point 1.5) or 4 (bits=4, exact)")
    if grid.n_codes <= 4:
        if grid.name == "seq2" and seq2_bits == 4:
            enc = _integer_encoding(grid, 4)
        elif accuracy_level == 0 or grid.name == "seq2":
            enc = NBitsEncoding(2, 1, 0, float(grid.zero))
        else:
            enc = _integer_encoding(grid, 2)
    else:
        enc = next((e for b in (4, 8) if 2**b >= grid.n_codes and (e := _integer_encoding(grid, b))), None)
    if enc is None:  # every grid in qat.grids has one; a new grid must be added here deliberately
        raise NBitsError(f"the {grid.name} grid has no exact MatMulNBits encoding")
    return enc


def choose_block_size(k: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two in [16, max_block] dividing K; if none divides it, ``max_block`` with the last block
    zero-padded (MatMulNBits takes k_blocks = ceil(K / block_size) and ignores the padding)."""
    if max_block < MIN_BLOCK or max_block & (max_block - 1):
        raise NBitsError(f"block size {max_block} must be a power of two >= {MIN_BLOCK}")
    block = max_block
    while block >= MIN_BLOCK:
        if k % block == 0:
            return block
        block //= 2
    return max_block


@dataclass
class NBitsWeight:
    """The initializers and attributes of one MatMulNBits node."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # float32 [N, k_blocks] or None (default)
    k: int
    n: int
    bits: int
    block_size: int
    encoding: NBitsEncoding

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp

    def attributes(self, accuracy_level: int) -> dict[str, int]:
        return {"K": self.k, "N": self.n, "bits": self.bits, "block_size": self.block_size,
                "accuracy_level": accuracy_level}


def pack_blocks(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """uint8 [N, K] container codes -> [N, k_blocks, block_size * bits / 8], low bits first along K: the
    checkpoint's own LSB-first row packing of the zero-padded rows, cut into blocks."""
    n, k = codes.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.uint8)
    padded[:, :k] = codes
    return pack_row_codes(padded, bits).reshape(n, k_blocks, block_size * bits // 8)


def encode_weight(codes: np.ndarray, step: np.ndarray, grid: Grid, encoding: NBitsEncoding,
                  max_block: int = MAX_BLOCK) -> NBitsWeight:
    """Codes uint8 [N, K] and fp16 steps [N] of ``grid`` -> MatMulNBits initializers (exact by construction;
    verify_onnx_readback proves it through onnxruntime)."""
    codes = np.asarray(codes)
    n, k = codes.shape
    if codes.size and int(codes.max()) >= grid.n_codes:
        raise NBitsError(f"code {int(codes.max())} is outside the {grid.name} grid")
    block = choose_block_size(k, max_block)
    k_blocks = -(-k // block)
    container = (codes.astype(np.int32) * encoding.mul + encoding.add).astype(np.uint8)
    # s / mul is exact in float32 for every fp16 s (mul is 1 or 2 and float32's exponent range covers fp16's)
    scale = np.asarray(step, dtype=np.float16).astype(np.float32) / np.float32(encoding.mul)
    scales = np.ascontiguousarray(np.repeat(scale[:, None], k_blocks, axis=1))
    zp = None
    if encoding.zero_point is not None:
        zp = np.full((n, k_blocks), encoding.zero_point, dtype=np.float32)
    return NBitsWeight(pack_blocks(container, encoding.bits, block), scales, zp, k, n, encoding.bits, block, encoding)
