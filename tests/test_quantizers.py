"""ParetoQ quantizers against an independent numpy transcription of the reference formulas (DESIGN.md section 2)."""

import math

import numpy as np
import pytest
import torch

from qat.grids import GRIDS, grid_for_bits, parse_bits
from qat.modules import QuantLinear
from qat.quantizers import fake_quantize, init_alpha, quantize_codes

ALL_BITS = [1, 1.58, 2, 3, 4]
LEVELS = {  # in units of alpha, as the ParetoQ paper writes them
    1: {-1.0, 1.0},
    1.58: {-2 / 3, 0.0, 2 / 3},
    2: {-0.75, -0.25, 0.25, 0.75},
    3: {float(v) for v in range(-4, 4)},
    4: {float(v) for v in range(-8, 8)},
}


def reference_forward_backward(w: np.ndarray, a: np.ndarray, bits: float, g: np.ndarray):
    """Straight from models/utils_quant.py of the ParetoQ reference (numpy, float64)."""
    a = np.where(a > 1e-5, a, 1e-5)
    x = w / a
    if bits == 1:
        q = np.sign(w)
        mid = (x >= -1) & (x <= 1)
        grad_scale = 1 / math.sqrt(w.size * 1)
        ga = (np.sign(w) * g * grad_scale).sum(-1, keepdims=True)
    elif bits in (1.58, 2):
        n, shift = (1.5, 0.0) if bits == 1.58 else (2.0, 0.5)
        clip = 1 - 1e-2
        q = (np.round(np.clip(x, -clip, clip) * n - shift) + shift) / n
        qp = (n - shift) / n
        small, big = x < -clip, x > clip
        mid = ~small & ~big
        grad_scale = 1 / math.sqrt(w.size)  # Qp of the integer grid is 1 for both SEQ settings
        term = np.where(small, -qp, np.where(big, qp, q - x))
        ga = (term * g * grad_scale).sum(-1, keepdims=True)
    else:
        qn, qp = -(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1
        q = np.clip(np.round(x), qn, qp)
        small, big = x < qn, x > qp
        mid = ~small & ~big
        grad_scale = 1 / math.sqrt(w.size * qp)
        term = np.where(small, qn, np.where(big, qp, np.round(x) - x))
        ga = (term * g * grad_scale).sum(-1, keepdims=True)
    return q * a, mid * g, ga


@pytest.mark.parametrize("bits", ALL_BITS)
def test_forward_produces_only_grid_levels(bits):
    torch.manual_seed(1)
    w = torch.randn(64, 128, dtype=torch.float64) * 0.02
    alpha = init_alpha(w, bits).double() * torch.empty(64, 1, dtype=torch.float64).uniform_(0.5, 1.2)
    wq = fake_quantize(w, alpha, bits)
    ratios = (wq / alpha).numpy().round(9)
    allowed = {round(v, 9) for v in LEVELS[bits]}
    assert set(np.unique(ratios).tolist()) <= allowed
    # every level is actually reached on random data (the grid is not accidentally narrower)
    assert len(np.unique(ratios)) == len(allowed)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_gradients_match_reference_formulas(bits):
    torch.manual_seed(2)
    w = torch.randn(32, 96, dtype=torch.float64) * 0.05
    alpha = (init_alpha(w, bits).double() * 0.8).requires_grad_()
    w.requires_grad_()
    g = torch.randn(32, 96, dtype=torch.float64)
    out = fake_quantize(w, alpha, bits)
    out.backward(g)
    ref_out, ref_gw, ref_ga = reference_forward_backward(w.detach().numpy(), alpha.detach().numpy(), bits, g.numpy())
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), ref_gw, rtol=0, atol=0)
    np.testing.assert_allclose(alpha.grad.numpy(), ref_ga, rtol=1e-10, atol=1e-12)
    assert alpha.grad.shape == (32, 1)
    # the clipped STE really clips something at these alphas (else the test would not test it)
    assert (w.grad == 0).any() or bits == 1


def test_alpha_is_clamped_like_the_reference():
    w = torch.randn(4, 16, dtype=torch.float64)
    alpha = torch.full((4, 1), -3.0, dtype=torch.float64)
    out = fake_quantize(w, alpha, 4)
    assert out.abs().max() <= 8e-5 + 1e-12  # eps 1e-5 times |Qn|


@pytest.mark.parametrize("bits", ALL_BITS)
def test_init_alpha_matches_reference(bits):
    w = torch.randn(8, 40)
    a = init_alpha(w, bits)
    expected = {
        1: w.abs().mean(-1, keepdim=True),
        1.58: w.abs().amax(-1, keepdim=True),
        2: w.abs().amax(-1, keepdim=True),
        3: w.abs().amax(-1, keepdim=True) / 3,
        4: w.abs().amax(-1, keepdim=True) / 7,
    }[bits]
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_codes_reproduce_forward(bits):
    grid = grid_for_bits(bits)
    w = torch.randn(16, 64)
    alpha = init_alpha(w, grid) * 0.7
    codes = quantize_codes(w, alpha, grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) < grid.n_codes
    rebuilt = alpha * grid.step_per_alpha * (codes.float() - grid.zero)
    torch.testing.assert_close(rebuilt, fake_quantize(w, alpha, grid), rtol=1e-6, atol=1e-7)


def test_bits_aliases_and_errors():
    assert parse_bits("ternary") == parse_bits(0) == parse_bits("1.58") == 1.58
    assert grid_for_bits(2) is GRIDS["seq2"]
    with pytest.raises(ValueError, match="unsupported bits"):
        parse_bits(5)


def test_quant_linear_keeps_bias_and_trains_alpha():
    lin = torch.nn.Linear(32, 16, bias=True)
    q = QuantLinear.from_linear(lin, 2)
    assert q.bias is lin.bias and q.alpha.shape == (16, 1)
    x = torch.randn(3, 32)
    y = q(x)
    expected = x @ fake_quantize(lin.weight, q.alpha, 2).T + lin.bias
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert q.alpha.grad is not None and q.alpha.grad.abs().sum() > 0


@pytest.mark.skipif(not hasattr(torch, "autocast"), reason="no autocast")
def test_quant_linear_under_cpu_bf16_autocast():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), 2)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert q.weight.grad.dtype == torch.float32 and q.alpha.grad.dtype == torch.float32
