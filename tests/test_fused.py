"""The fused fake-quant (qat/fused.py) against the reference autograd function: outputs and the weight, alpha and
input gradients, every grid, on CPU (inductor C++ kernels; the Triton kernels through Triton's interpreter when
triton is installed)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from qat import fused as fused_module
from qat.fused import fused_default, fused_fake_quantize, resolve_backend, set_fused
from qat.quantizers import ste_bounds
from qat.grids import grid_for_bits
from qat.modules import QuantLinear
from qat.prepare import QATConfig, prepare, quantized_modules
from qat.quantizers import fake_quantize, init_alpha
from qat.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
ALL_BITS = [1, 1.58, 2, 3, 4]


def _pair(bits, shape=(24, 80), seed=0):
    """Weight and alpha (alphas below init, so every grid clips some weights) as two independent leaf copies."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    a = init_alpha(w, bits) * torch.empty(shape[0], 1).uniform_(0.6, 0.9, generator=gen)
    return [(w.clone().requires_grad_(), a.clone().requires_grad_()) for _ in range(2)]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_fused_matches_reference(bits):
    grid = grid_for_bits(bits)
    (w1, a1), (w2, a2) = _pair(bits)
    g = torch.randn(w1.shape, generator=torch.Generator().manual_seed(1))
    fused = fused_fake_quantize(w1, a1, grid, backend="inductor")
    ref = fake_quantize(w2, a2, grid)
    fused.backward(g)
    ref.backward(g)
    torch.testing.assert_close(fused, ref, rtol=0, atol=0)  # same operations in the same order
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=0)  # the clipped STE is a mask
    # grad_scale applied after the row sum instead of inside it, summed in another order: float32 rounding of a
    # sum that partly cancels, so measured against the largest row gradient
    torch.testing.assert_close(a1.grad, a2.grad, rtol=0, atol=1e-5 * a2.grad.abs().max().item())
    assert (w2.grad == 0).any() or bits == 1  # the clip was exercised
    assert a2.grad.abs().min() > 0


@pytest.mark.parametrize("bits", [1.58, 4])
def test_fused_quant_linear_input_gradient_and_autocast(bits):
    torch.manual_seed(3)
    lin = nn.Linear(48, 32, bias=True)
    ref = QuantLinear.from_linear(lin, bits)
    fused = QuantLinear.from_linear(nn.Linear(48, 32, bias=True), bits)
    fused.load_state_dict(ref.state_dict())
    set_fused(fused, True)
    x1 = torch.randn(5, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    for autocast in (False, True):  # bf16 autocast: the fused path writes the bf16 weight directly
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y1, y2 = fused(x1), ref(x2)
        assert y1.dtype == y2.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        y1.float().square().sum().backward()
        y2.float().square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
        torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused.alpha.grad, ref.alpha.grad, rtol=0,
                                   atol=1e-5 * ref.alpha.grad.abs().max().item())
        for p in (x1, x2, *fused.parameters(), *ref.parameters()):
            p.grad = None


def test_one_kernel_serves_every_shape():
    """dynamic shapes on detached parameters: nine weight shapes (more than dynamo's recompile limit of 8) in one
    process, as the linears of one model plus another; a per-shape recompile would fail here (fullgraph)."""
    grid = grid_for_bits(2)
    for i in range(9):
        w = nn.Parameter(torch.randn(8 + i, 16 + 3 * i))
        a = nn.Parameter(init_alpha(w, grid))
        fused_fake_quantize(w, a, grid, backend="inductor").sum().backward()
        assert w.grad.shape == w.shape and a.grad.shape == a.shape


def test_fused_training_equals_unfused():
    from tiny_models import tiny_model

    blocks = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (False, True):
        model = prepare(tiny_model("llama", hidden=64, intermediate=128), QATConfig(bits=2))
        result = train(model, blocks, None, TrainConfig(steps=2, batch_size=2, lr=1e-3, eval_every=0,
                                                        eval_at_start=False, progress=False, device="cpu",
                                                        log_every=1, fused=fused))
        runs.append((result, model))
        assert not any(m.fused for m in quantized_modules(model).values())  # the setting is restored
    (r0, m0), (r1, m1) = runs
    assert [v for _, v in r0.loss_history] == pytest.approx([v for _, v in r1.loss_history], rel=1e-6)
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert max((s0[k] - s1[k]).abs().max().item() for k in s0) < 1e-6


def test_backend_choice_and_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "inductor"
    assert fused_default("cpu") is False and fused_default("cuda") is True
    with pytest.raises(ValueError, match="fused backend 'cuda' is unknown"):
        resolve_backend("cuda", torch.device("cpu"))


TRITON_CHECK = textwrap.dedent("""
    import torch
    from qat.fused import fused_fake_quantize
    from qat.grids import grid_for_bits
    from qat.quantizers import fake_quantize, init_alpha

    for bits in (1, 1.58, 2, 3, 4):
        grid = grid_for_bits(bits)
        for shape in ((6, 1500), (16, 64)):  # a row longer than one block: the looped row reduction
            w = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05
            a = init_alpha(w, grid) * 0.75
            g = torch.randn(shape, generator=torch.Generator().manual_seed(6))
            (w1, a1), (w2, a2) = [(w.clone().requires_grad_(), a.clone().requires_grad_()) for _ in range(2)]
            y1 = fused_fake_quantize(w1, a1, grid, backend="triton")
            y2 = fake_quantize(w2, a2, grid)
            y1.backward(g)
            y2.backward(g)
            assert torch.equal(y1, y2), (bits, shape)
            assert torch.equal(w1.grad, w2.grad), (bits, shape)
            torch.testing.assert_close(a1.grad, a2.grad, rtol=0, atol=1e-5 * a2.grad.abs().max().item())
    print("triton kernels match")
""")


def test_triton_kernels_in_the_interpreter(tmp_path):
    """The CUDA kernels, run by Triton's CPU interpreter (fp32 output: its bf16 conversion is not the GPU's).
    The GPU run of bench/qat_throughput.py repeats this check on the device with bf16 output."""
    pytest.importorskip("triton")
    script = tmp_path / "check.py"
    script.write_text(TRITON_CHECK)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton kernels match" in done.stdout


def test_ste_bounds_one_definition():
    """DESIGN.md section 2's STE band and saturation values, from the one function both fused paths read."""
    b = ste_bounds(grid_for_bits(2))
    assert (b.low, b.high, b.below, b.above, b.seq_levels, b.seq_shift) == (-0.99, 0.99, -0.75, 0.75, 2.0, 0.5)
    b = ste_bounds(grid_for_bits(1.58))
    assert (b.low, b.high, b.below, b.above, b.seq_levels, b.seq_shift) == (-0.99, 0.99, -1.0, 1.0, 1.5, 0.0)
    b = ste_bounds(grid_for_bits(4))
    assert (b.low, b.high, b.below, b.above) == (-8.0, 7.0, -8.0, 7.0)
    b = ste_bounds(grid_for_bits(1))
    assert (b.low, b.high) == (-1.0, 1.0)  # sign: the weight gradient passes where |w / alpha| <= 1
    # the Triton kernels get the same numbers as constexprs
    consts, extra = fused_module._triton_constants(grid_for_bits(2))
    assert (consts["LOW"], consts["HIGH"], consts["N"], consts["SHIFT"], extra["BELOW"], extra["ABOVE"]) == (
        -0.99, 0.99, 2.0, 0.5, -0.75, 0.75)


def test_no_import_cycle_and_fixed_reduction_order():
    """qat.fused imports nothing of qat.modules (modules imports fused), and its alpha-gradient row reduction
    has a fixed order (one Triton program per row looping over the columns; inductor reductions use no atomics):
    two identical runs give identical alpha gradients, which TrainConfig(deterministic=True) relies on."""
    code = "import sys, qat.fused; assert 'qat.modules' not in sys.modules, 'qat.fused imported qat.modules'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    source = Path(fused_module.__file__).read_text()
    assert "tl.atomic" not in source and "atomic_add" not in source
    lin = QuantLinear.from_linear(nn.Linear(16, 8), 2)
    assert set_fused(nn.Sequential(lin), True) == {lin: False} and lin.fused
