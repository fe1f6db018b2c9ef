"""com.microsoft MatMulNBits initializers built from the canonical checkpoint's integer codes and fp16 steps.

MatMulNBits computes ``Y = A @ W^T`` with ``W[n, k] = scales[n, k // block] * (B[n, k] - zero_points[n, k // block])``
(B packed low bits first along K, ``bits`` in {2, 4, 8}, zero point default ``2^(bits-1)``). Every ParetoQ grid
``w = s * (q - z)`` maps onto it exactly (DESIGN.md section 3), as ``NBitsEncoding`` says:

    container code = mul * q + add,   scale = s / mul (float32: exact for any fp16 s),   zero point = add + mul * z

so ``scale * (code - zp) = s * (q - z)``. A per-row step is replicated across the row's K blocks; per-group steps
(one per G consecutive columns) take ``block_size`` = the largest power of two <= the cap dividing G, each block
holding its group's step. Whether the zero point is the op's default (no input) or a float input matters to
onnxruntime 1.32's CPU kernels [measured on this machine, M=1, 2 threads, block 64]:

    weight       level  bits=2 int zp  bits=2 float zp  bits=4  bits=8      (ms per call)
    1536 x 576   4      0.068          0.65             0.070   0.077
    1536 x 576   0      ~4.5 (1 thread) 0.61            0.19    4.9
    49152 x 576  4      2.0            86               2.1     1.5
    49152 x 576  0      -              88               2.9     146

so the default is integer zero points at accuracy_level 4 (choose_encoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    why: str = field(default="", compare=False)  # said in the export log

    @property
    def kind(self) -> str:
        return f"int{self.bits}" + ("-float-zp" if self.zero_point is not None else "")


def _integer_encoding(grid: Grid, bits: int, why: str = "") -> NBitsEncoding | None:
    """The default-zero-point encoding of ``grid`` in ``bits``, if its integer form fits: container code =
    k + 2^(bits-1) with k = mult * (q - z) (canonical.grids.integer_form)."""
    form = integer_form(grid)
    if not form.fits_signed(bits):
        return None
    return NBitsEncoding(bits, form.mult, 2 ** (bits - 1) + form.low, None, why)


def choose_encoding(grid: Grid, accuracy_level: int, smallest: bool = False) -> NBitsEncoding:
    """The exact MatMulNBits encoding for ``grid``: by default the one onnxruntime 1.32 runs fastest, with
    ``smallest`` the fewest bytes. Measured on this machine (M=1, 1536x576 and 49152x576, 2 threads; module
    docstring): integer zero points run the int8 kernels at level 4 at the same speed in bits 2, 4 and 8; a float
    zero point (2-bit SEQ's 1.5 in bits=2) always dequantizes to fp32 first (~10x slower, ~40x on a vocabulary-wide
    head); at level 0 bits=4 is fast, bits=2 with an integer zero point and bits=8 are not.

        grid             default (fast)                       smallest
        seq2             bits=4 codes 2q+5, step s/2           bits=2, float zero point 1.5
        binary/ternary   level 4: bits=2, integer zero point   level 4: same; level 0: bits=2, float zero point
                         level 0: bits=4 (integer)
        lsq3/lsq4        bits=4                                bits=4
        lsq8 (embedding) bits=8                                bits=8
    """
    if accuracy_level not in (0, 4):
        raise NBitsError(f"accuracy level {accuracy_level} is not supported: use 0 (float activations, exact) or 4 "
                         "(int8 activations, fast)")
    enc = None
    if grid.n_codes <= 4:
        float_zp = NBitsEncoding(2, 1, 0, float(grid.zero), "bits=2 with a float zero point: smallest; onnxruntime "
                                 "dequantizes it to fp32 on every call")
        if grid.name == "seq2":
            enc = float_zp if smallest else _integer_encoding(
                grid, 4, "bits=4 with integer zero point (codes 2q+5, step s/2): onnxruntime's int kernels; "
                         "--smallest keeps bits=2 (float zero point 1.5, ~35% fewer linear bytes, ~10x slower)")
        elif accuracy_level == 4:
            enc = _integer_encoding(grid, 2, "bits=2 with integer zero point: int8 kernels at accuracy level 4")
        else:
            enc = float_zp if smallest else _integer_encoding(
                grid, 4, "bits=4 with integer zero point: onnxruntime's fast path at accuracy level 0")
    else:
        enc = next((e for b in (4, 8) if 2**b >= grid.n_codes
                    and (e := _integer_encoding(grid, b, f"bits={b} with integer zero point"))), None)
    if enc is None:  # every grid in canonical.grids has one; a new grid must be added here deliberately
        raise NBitsError(f"the {grid.name} grid has no exact MatMulNBits encoding")
    return enc


def choose_block_size(k: int, max_block: int = MAX_BLOCK, group_size: int | None = None) -> int:
    """Per-row steps (``group_size`` None): the largest power of two in [16, max_block] dividing K; if none divides
    it, ``max_block`` with the last block zero-padded (MatMulNBits takes k_blocks = ceil(K / block_size) and ignores
    the padding). Per-group steps: the largest power of two in [16, max_block] dividing G, so every block lies in
    one group; none (G not a multiple of 16) is refused."""
    if max_block < MIN_BLOCK or max_block & (max_block - 1):
        raise NBitsError(f"block size {max_block} must be a power of two >= {MIN_BLOCK}")
    width = k if group_size is None else group_size
    block = max_block
    while block >= MIN_BLOCK:
        if width % block == 0:
            return block
        block //= 2
    if group_size is not None:
        raise NBitsError(f"group size {group_size} cannot be held by MatMulNBits (blocks are powers of two >= "
                         f"{MIN_BLOCK} lying inside one group): re-quantize with a group size that is a multiple of "
                         f"{MIN_BLOCK} (32, 64, 128, 256) or with per-row steps")
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


def block_steps(step: np.ndarray, k: int, block: int) -> np.ndarray:
    """fp16 steps per row [N] or per group [N, K // G] -> float32 [N, k_blocks], one per MatMulNBits block (a block
    lies in one group: choose_block_size)."""
    step = np.asarray(step, dtype=np.float16).astype(np.float32)
    k_blocks = -(-k // block)
    if step.ndim == 1:
        return np.repeat(step[:, None], k_blocks, axis=1)
    group = k // step.shape[1]
    return step[:, (np.arange(k_blocks) * block) // group]


def encode_weight(codes: np.ndarray, step: np.ndarray, grid: Grid, encoding: NBitsEncoding,
                  max_block: int = MAX_BLOCK) -> NBitsWeight:
    """Codes uint8 [N, K] and fp16 steps [N] or [N, K // G] of ``grid`` -> MatMulNBits initializers (exact by
    construction; verify_onnx_readback proves it through onnxruntime)."""
    codes = np.asarray(codes)
    step = np.asarray(step)
    n, k = codes.shape
    if codes.size and int(codes.max()) >= grid.n_codes:
        raise NBitsError(f"code {int(codes.max())} is outside the {grid.name} grid")
    block = choose_block_size(k, max_block, None if step.ndim == 1 else k // step.shape[1])
    container = (codes.astype(np.int32) * encoding.mul + encoding.add).astype(np.uint8)
    # s / mul is exact in float32 for every fp16 s (mul is 1 or 2 and float32's exponent range covers fp16's)
    scales = np.ascontiguousarray(block_steps(step, k, block) / np.float32(encoding.mul))
    zp = None
    if encoding.zero_point is not None:
        zp = np.full(scales.shape, encoding.zero_point, dtype=np.float32)
    return NBitsWeight(pack_blocks(container, encoding.bits, block), scales, zp, k, n, encoding.bits, block, encoding)
