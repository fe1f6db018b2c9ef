"""ParetoQ fake quantization: forward, straight-through backward and the learnable per-row alpha.

Forward and backward follow the ParetoQ reference (``models/utils_quant.py``):

- 1 bit (LSQ-binary): ``sign(w) * alpha``; weight gradient passes where |w/alpha| <= 1;
  alpha gets ``sum_row(sign(w) * g) * grad_scale``.
- 1.58 and 2 bits (SEQ, Stretched Elastic Quant):
  ``(round(clamp(x, -0.99, 0.99) * n - shift) + shift) / n * alpha`` with (n, shift) = (1.5, 0) or (2, 0.5);
  weight gradient passes where |x| <= 0.99; alpha gets -+(n - shift)/n outside and ``q_hat - x`` inside.
- 3 and 4 bits (LSQ): ``round(x).clamp(Qn, Qp) * alpha``; weight gradient passes where Qn <= x <= Qp;
  alpha gets Qn below, Qp above and ``round(x) - x`` inside.

``grad_scale = 1 / sqrt(numel(W) * Qp)`` with Qp = 1 for sign and SEQ, numel over the whole tensor. alpha is
clamped to >= 1e-5 in the forward exactly as the reference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from paretoq_export.canonical.grids import dequantize_codes  # noqa: F401 - one definition, re-exported
from qat.grids import Grid, grid_for_bits

ALPHA_EPS = 1e-5
SEQ_CLIP = 1.0 - 1e-2


@dataclass(frozen=True)
class SteBounds:
    """A grid's straight-through-estimator constants, in units of alpha (x = w / alpha)."""
    low: float  # the weight gradient passes where low <= x <= high (the clipped STE band)
    high: float
    below: float  # alpha's gradient term where x < low, and where x > high (the saturated levels)
    above: float
    seq_levels: float  # SEQ's n and shift in (round(clamp(x) * n - shift) + shift) / n; 1 and 0 (the identity,
    seq_shift: float  # never read) for sign and LSQ


def ste_bounds(grid: Grid) -> SteBounds:
    """The one definition of the STE band and saturation values, used by the reference backward below and by both
    fused paths (qat/fused.py). DESIGN.md section 2: LSQ passes Qn <= x <= Qp and saturates at Qn / Qp; SEQ passes |x| <= 0.99 and saturates at -+(n - shift) / n; sign passes
    |x| <= 1 (qn, qp = -1, 1), its alpha term being sign(w) everywhere, so below/above are not read."""
    if grid.method == "seq":
        n, shift = float(grid.seq_levels), float(grid.seq_shift)
        saturation = (n - shift) / n
        return SteBounds(-SEQ_CLIP, SEQ_CLIP, -saturation, saturation, n, shift)
    return SteBounds(float(grid.qn), float(grid.qp), float(grid.qn), float(grid.qp), 1.0, 0.0)


def _clamped_alpha(alpha: torch.Tensor) -> torch.Tensor:
    # a Python scalar, not torch.tensor(eps, device=...): that host-to-device copy synchronised CUDA on every call
    return torch.where(alpha > ALPHA_EPS, alpha, ALPHA_EPS)


def _level_index(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The signed integer level of x = w / alpha, as a float tensor (sign: -1/0/+1)."""
    if grid.method == "sign":
        return x.sign()
    if grid.method == "seq":
        return torch.round(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * grid.seq_levels - grid.seq_shift)
    return torch.round(x).clamp(grid.qn, grid.qp)


def _level_value(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The quantized value of x in units of alpha (the reference's q_w)."""
    idx = _level_index(x, grid)
    if grid.method == "seq":
        return (idx + grid.seq_shift) / grid.seq_levels
    return idx


class ParetoQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, alpha: torch.Tensor, grid: Grid) -> torch.Tensor:
        alpha = _clamped_alpha(alpha)
        ctx.save_for_backward(weight, alpha)
        ctx.grid = grid
        return _level_value(weight / alpha, grid) * alpha

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, alpha = ctx.saved_tensors
        grid: Grid = ctx.grid
        grad_scale = 1.0 / math.sqrt(weight.numel() * grid.grad_qp)
        x = weight / alpha
        b = ste_bounds(grid)
        low, high, below, above = b.low, b.high, b.below, b.above
        middle = (x >= low) & (x <= high)
        if grid.method == "sign":
            alpha_term = weight.sign()
        else:
            inside = _level_value(x, grid) - x
            alpha_term = torch.where(middle, inside, torch.where(x < low, below, above))
        grad_alpha = (alpha_term * grad_output * grad_scale).sum(dim=-1, keepdim=True)
        grad_weight = grad_output * middle.to(grad_output.dtype)
        return grad_weight, grad_alpha, None


def fake_quantize(weight: torch.Tensor, alpha: torch.Tensor, bits: str | float | Grid) -> torch.Tensor:
    """ParetoQ fake quantization of a 2-D weight with per-row alpha [out, 1] (differentiable in both)."""
    grid = bits if isinstance(bits, Grid) else grid_for_bits(bits)
    return ParetoQFakeQuant.apply(weight, alpha, grid)


ALPHA_INITS = ("paper", "mse")


@torch.no_grad()
def init_alpha(weight: torch.Tensor, bits: str | float | Grid, method: str = "paper") -> torch.Tensor:
    """Per-row alpha initialisation.

    "paper": the reference's mean|W| (1 bit), max|W| (SEQ), max|W|/Qp (LSQ). "mse": the alpha that minimises each
    row's squared quantization error ||W - Q(W)||^2 (a search, see ``search_alpha``), starting the grid where the
    weights are instead of at their extremes (max|W| puts most of a 2-bit row on its two inner levels).
    """
    grid = bits if isinstance(bits, Grid) else grid_for_bits(bits)
    if method not in ALPHA_INITS:
        raise ValueError(f"alpha init {method!r} is unknown: choose from {', '.join(ALPHA_INITS)}")
    w = weight.detach().float().abs()
    if grid.method == "sign":
        alpha = w.mean(dim=-1, keepdim=True)  # already the MSE-optimal binary scale (XNOR-Net)
    elif grid.method == "seq":
        alpha = w.amax(dim=-1, keepdim=True)
    else:
        alpha = w.amax(dim=-1, keepdim=True) / grid.qp
    alpha = alpha.clamp_min(ALPHA_EPS)
    if method == "mse" and grid.method != "sign":
        alpha = search_alpha(weight, grid, alpha)
    return alpha


@torch.no_grad()
def search_alpha(weight: torch.Tensor, grid: Grid, start: torch.Tensor, candidates: int = 64,
                 low: float = 0.05) -> torch.Tensor:
    """Per row, the alpha among ``candidates`` evenly spaced fractions [low, 1] of ``start`` (the paper's
    max-based alpha, which covers every weight) with the least squared quantization error. One pass over the
    weight per candidate, so memory stays at a few copies of the weight."""
    w = weight.detach().float()
    best_err = torch.full_like(start, float("inf"))
    best = start.clone()
    for fraction in torch.linspace(low, 1.0, candidates).tolist():
        alpha = (start * fraction).clamp_min(ALPHA_EPS)
        err = (_level_value(w / alpha, grid) * alpha - w).pow(2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, alpha, best)
    return best


@torch.no_grad()
def quantize_codes(weight: torch.Tensor, alpha: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Unsigned integer codes q (uint8) of the fake-quantized weight, with the same arithmetic as the forward.

    The reference maps an exactly-zero latent weight to 0 at 1 bit (sign(0) = 0), a value the binary grid cannot
    hold; such weights (measure zero after training) get code 1 (+alpha).
    """
    x = weight.float() / _clamped_alpha(alpha.float())
    idx = _level_index(x, grid)
    if grid.method == "sign":
        return (idx >= 0).to(torch.uint8)
    if grid.method == "seq":
        # (idx + shift) / n == (q - z) * step_per_alpha  =>  q = idx + z + shift
        return (idx + (grid.zero + grid.seq_shift)).to(torch.uint8)
    return (idx - grid.qn).to(torch.uint8)


def alpha_to_step(alpha: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The canonical per-row step s = alpha * step_per_alpha, rounded once to fp16 (shape [out])."""
    return (_clamped_alpha(alpha.detach().float()) * grid.step_per_alpha).reshape(-1).to(torch.float16)
