"""The ParetoQ weight grids, as data, and the one rule that turns codes back into weights.

Every grid is written in the canonical form used by the checkpoint and all exporters:

    w = s * (q - z),   q an unsigned integer code in [0, n_codes), s a step per row (or per group of G columns),
                       z the grid's zero.

The training-time parameter is ParetoQ's ``alpha`` per row (or per group); ``s = alpha * step_per_alpha``.
(DESIGN.md section 2.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    name: str  # stable identifier stored in checkpoints
    bits: float  # nominal bits per weight (1.58 for ternary)
    method: str  # "sign" | "seq" | "lsq": which ParetoQ quantizer trains it
    n_codes: int  # number of levels
    code_bits: int  # bits per packed code in the checkpoint
    zero: float  # z in w = s * (q - z)
    step_per_alpha: float  # s = alpha * step_per_alpha
    # SEQ parameters (n_levels, shift); LSQ clamp range (qn, qp)
    seq_levels: float = 0.0
    seq_shift: float = 0.0
    qn: int = 0
    qp: int = 0

    @property
    def levels(self) -> list[float]:
        """The grid's values in units of alpha."""
        return [(q - self.zero) * self.step_per_alpha for q in range(self.n_codes)]

    @property
    def grad_qp(self) -> int:
        """The Qp used in ParetoQ's grad_scale = 1/sqrt(numel * Qp) (1 for sign and SEQ)."""
        return self.qp if self.method == "lsq" else 1

    def to_json(self) -> dict:
        return {
            "bits": self.bits,
            "method": self.method,
            "n_codes": self.n_codes,
            "code_bits": self.code_bits,
            "zero": self.zero,
            "step_per_alpha": self.step_per_alpha,
        }


@dataclass(frozen=True)
class IntegerForm:
    """A grid as signed integers, the one rule every integer container (ggml blocks, MatMulNBits, torchao intx)
    follows: k = mult * (q - z), step s / mult, so (s / mult) * k = s * (q - z). mult is 2 for grids with a
    half-integer zero (binary z = 0.5, 2-bit SEQ z = 1.5: odd integers, half the step), else 1."""

    mult: int
    low: int  # k of code 0
    high: int  # k of the last code

    def integers(self, codes, zero: float):
        """k = mult * (q - z) for an integer array of codes (numpy or torch), exact."""
        return codes * self.mult - int(round(self.mult * zero))

    def fits_signed(self, bits: int) -> bool:
        return -(2 ** (bits - 1)) <= self.low and self.high < 2 ** (bits - 1)


def integer_form(grid: Grid) -> IntegerForm:
    mult = 1 if float(grid.zero).is_integer() else 2
    return IntegerForm(mult, int(round(-mult * grid.zero)), int(round(mult * (grid.n_codes - 1 - grid.zero))))


def _lsq(bits: int) -> Grid:
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return Grid(f"lsq{bits}", bits, "lsq", 2**bits, bits, float(-qn), 1.0, qn=qn, qp=qp)


BINARY = Grid("binary", 1, "sign", 2, 1, 0.5, 2.0, qn=-1, qp=1)
TERNARY = Grid("ternary", 1.58, "seq", 3, 2, 1.0, 2.0 / 3.0, seq_levels=1.5, seq_shift=0.0)
SEQ2 = Grid("seq2", 2, "seq", 4, 2, 1.5, 0.5, seq_levels=2.0, seq_shift=0.5)
LSQ3 = _lsq(3)
LSQ4 = _lsq(4)
LSQ8 = _lsq(8)  # size option for embeddings / lm_head (not a ParetoQ weight grid)

GRIDS: dict[str, Grid] = {g.name: g for g in (BINARY, TERNARY, SEQ2, LSQ3, LSQ4, LSQ8)}
_BY_BITS: dict[float, Grid] = {1.0: BINARY, 1.58: TERNARY, 2.0: SEQ2, 3.0: LSQ3, 4.0: LSQ4, 8.0: LSQ8}

WEIGHT_BITS = (1.0, 1.58, 2.0, 3.0, 4.0)
EMBEDDING_BITS = (4.0, 8.0)


def parse_bits(value: str | float | int) -> float:
    """Normalise a bits spelling: 1, 1.58 / 1.5 / ternary / 0 (the reference's name), 2, 3, 4, 8."""
    text = str(value).strip().lower()
    if text in ("ternary", "0", "1.58", "1.5", "1.6", "tern"):
        return 1.58
    if text in ("binary",):
        return 1.0
    try:
        bits = float(text)
    except ValueError:
        bits = -1.0
    if bits not in _BY_BITS:
        raise ValueError(
            f"unsupported bits {value!r}: use one of 1, 1.58 (or 'ternary'/0), 2, 3, 4 "
            "(8 only for embeddings / lm_head)"
        )
    return bits


def grid_for_bits(bits: str | float | int) -> Grid:
    return _BY_BITS[parse_bits(bits)]


def format_bits(bits: float) -> str:
    """'2', '1.58', '4' -- for names and tables."""
    return str(int(bits)) if float(bits).is_integer() else str(bits)


def group_size_of(shape: tuple[int, int], step_shape: tuple[int, ...]) -> int:
    """The number of consecutive columns that share one step: the row length for a per-row step [out], in // G for
    a per-group step [out, in // G]."""
    cols = shape[1]
    if len(step_shape) == 1 or step_shape[1] == 1:
        return cols
    return cols // step_shape[1]


def expand_steps(step: torch.Tensor, cols: int) -> torch.Tensor:
    """The step of every weight, float32 [out, cols]: a per-row step [out] or a per-group step [out, cols // G]
    (group g covers columns g*G .. g*G + G - 1)."""
    step = step.float()
    if step.dim() == 1:
        step = step.reshape(-1, 1)
    if step.shape[1] == 1:
        return step.expand(-1, cols)
    return step.repeat_interleave(cols // step.shape[1], dim=1)


def dequantize_codes(codes: torch.Tensor, step: torch.Tensor, grid: Grid) -> torch.Tensor:
    """w = s * (q - z) in float32, s per row [out] or per group [out, in // G]. Exact: an fp16 step times a small
    half-integer fits fp32's mantissa."""
    return expand_steps(step, codes.shape[1]) * (codes.float() - grid.zero)
