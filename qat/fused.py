"""Fused ParetoQ fake quantization: the same forward and backward as ``qat.quantizers.ParetoQFakeQuant``, each
one kernel: hand-written Triton kernels on CUDA, the same formulas compiled by ``torch.compile`` (inductor C++)
elsewhere.

Why: the reference autograd function runs every step of the formula as its own full-size elementwise kernel
(about 8 in the forward and 15 in the backward, each reading and writing the whole fp32 latent weight), which
added 31-39% to a 1.1B Llama's training step on an H100 (2-bit: 1.39x, 4-bit: 1.31x the bf16 step). Here the forward is one pass (read the fp32 weight and the
per-row alpha, write the quantized weight directly in the matmul's dtype, bf16 under autocast) and the backward
one pass (read the weight and the incoming gradient, write the clipped-STE weight gradient and reduce the
per-row alpha gradient in the same kernel). Nothing beyond the weight and alpha is saved for the backward: the
levels are recomputed there, as the reference does.

Why Triton by hand on CUDA rather than torch.compile there: measured on an H100 (bench/qat_throughput.py), the
compiled call's CPU overhead (dynamo guards, wrappers) per linear per step made QAT CPU-bound: SmolLM2-135M's
210 quantized linears ran at 2.1x the bf16 step with it against 1.2-1.4x with direct Triton launches.

The reference (unfused) path stays the definition; tests/test_fused.py checks this one against it (the Triton
kernels through Triton's CPU interpreter; bench/qat_throughput.py repeats the check on the GPU).
Determinism: the per-row alpha gradient is reduced in a fixed order in both paths, so identical inputs give
identical bits (what TrainConfig.deterministic relies on): the Triton backward runs one program per row that loops
over the row's columns in order and sums its block in registers (no atomics, no split across programs); inductor
reductions never use atomics (a split reduction writes partial sums, then reduces them in a second kernel).

In the inductor path ``grad_scale = 1/sqrt(numel * Qp)`` is applied to the small [out, 1] alpha gradient outside
the kernel so that the compiled graph does not depend on the weight's size (one dynamic-shape kernel serves every
layer); the Triton kernel takes it as an argument.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Callable

import torch
from torch import nn

from qat.grids import Grid
from qat.quantizers import ALPHA_EPS, SEQ_CLIP, ste_bounds


def _kernels(grid: Grid) -> tuple[Callable, Callable]:
    """(forward, backward) plain-tensor functions of one grid, with its constants baked in as Python floats."""
    method = grid.method
    b = ste_bounds(grid)
    n, shift, low, high, below, above = b.seq_levels, b.seq_shift, b.low, b.high, b.below, b.above

    def level_value(x: torch.Tensor) -> torch.Tensor:
        # the same operations in the same order as qat.quantizers._level_value
        if method == "sign":
            return x.sign()
        if method == "seq":
            return (torch.round(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * n - shift) + shift) / n
        return torch.round(x).clamp(low, high)

    def clamped(alpha: torch.Tensor) -> torch.Tensor:
        return torch.where(alpha > ALPHA_EPS, alpha, ALPHA_EPS)

    def forward(weight: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        a = clamped(alpha)
        return (level_value(weight / a) * a).to(out_dtype)

    def backward(grad_out: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor):
        a = clamped(alpha)
        x = weight / a
        g = grad_out.to(weight.dtype)
        middle = (x >= low) & (x <= high)
        if method == "sign":
            alpha_term = weight.sign()
        else:
            alpha_term = torch.where(middle, level_value(x) - x, torch.where(x < low, below, above))
        grad_alpha_unscaled = (alpha_term * g).sum(dim=-1, keepdim=True)
        grad_weight = g * middle.to(g.dtype)
        return grad_weight, grad_alpha_unscaled

    return forward, backward


def _own_code(fn: Callable, tag: str) -> Callable:
    """fn with a code object of its own. Dynamo keeps compiled graphs (and counts recompiles, 8 at most) per code
    object: without this the closures of all five grids would share one cache and, with two output dtypes, a
    bits sweep in one process would run past the limit."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


@functools.lru_cache(maxsize=None)
def compiled_kernels(grid: Grid) -> tuple[Callable, Callable]:
    """The grid's kernels under torch.compile, compiled lazily on first call and cached per grid.

    dynamic=True: one kernel for every weight shape (a model has 4-5 distinct linear shapes; specialising on each
    would recompile per shape and hit dynamo's recompile limit). The callers pass detached tensors: dynamo keeps
    nn.Parameter shapes static whatever ``dynamic`` says.
    """
    forward, backward = _kernels(grid)
    return (torch.compile(_own_code(forward, grid.name), dynamic=True, fullgraph=True),
            torch.compile(_own_code(backward, grid.name), dynamic=True, fullgraph=True))


# ------------------------------------------------------------------------------------------ Triton (CUDA)

_METHOD_ID = {"sign": 0, "seq": 1, "lsq": 2}


try:  # Triton ships with CUDA builds of torch; the CPU wheel has none (the inductor path serves there)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# The kernels are defined at import time, so TRITON_INTERPRET=1 (which runs them on CPU tensors: how the tests
# check them without a GPU) must be set before qat.fused is first imported.
if triton is not None:

    @triton.jit
    def _rint(x):
        # round half to even, as torch.round: adding 1.5 * 2**23 pushes the fraction out of an fp32 mantissa under
        # round-to-nearest-even; |x| >= 2**22 is already an integer. (libdevice.rint is not in the interpreter.)
        magic = 12582912.0
        return tl.where(tl.abs(x) < 4194304.0, (x + magic) - magic, x)

    @triton.jit
    def _level_value(x, METHOD: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr, LOW: tl.constexpr,
                     HIGH: tl.constexpr, CLIP: tl.constexpr):
        # the reference's operations in its order; div_rn: IEEE division like torch (Triton's '/' is approximate)
        if METHOD == 0:
            return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        elif METHOD == 1:
            t = _rint(tl.minimum(tl.maximum(x, -CLIP), CLIP) * N - SHIFT)
            return tl.math.div_rn(t + SHIFT, tl.full(x.shape, N, tl.float32))
        else:
            return tl.minimum(tl.maximum(_rint(x), LOW), HIGH)

    @triton.jit
    def _forward_kernel(w_ptr, a_ptr, out_ptr, n_cols, EPS: tl.constexpr, METHOD: tl.constexpr, N: tl.constexpr,
                        SHIFT: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr, CLIP: tl.constexpr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        a = tl.load(a_ptr + row).to(tl.float32)
        a = tl.where(a > EPS, a, EPS)
        w = tl.load(w_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.math.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * a)
        out = _level_value(x, METHOD, N, SHIFT, LOW, HIGH, CLIP) * a
        tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(g_ptr, w_ptr, a_ptr, gw_ptr, ga_ptr, grad_scale, n_cols: tl.constexpr, EPS: tl.constexpr,
                         METHOD: tl.constexpr, N: tl.constexpr, SHIFT: tl.constexpr, LOW: tl.constexpr,
                         HIGH: tl.constexpr, CLIP: tl.constexpr, BELOW: tl.constexpr, ABOVE: tl.constexpr,
                         BLOCK: tl.constexpr):
        # one program per row: the clipped-STE weight gradient and the row's alpha gradient in one pass.
        # n_cols is a compile-time constant (a model has 2-3 widths): the loop bound is then static, which the
        # Triton interpreter also needs
        row = tl.program_id(0).to(tl.int64)
        a = tl.load(a_ptr + row).to(tl.float32)
        a = tl.where(a > EPS, a, EPS)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            offs = row * n_cols + cols
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.math.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * a)
            middle = (x >= LOW) & (x <= HIGH)
            tl.store(gw_ptr + offs, tl.where(middle, g, 0.0).to(gw_ptr.dtype.element_ty), mask=mask)
            if METHOD == 0:
                term = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
            else:
                inside = _level_value(x, METHOD, N, SHIFT, LOW, HIGH, CLIP) - x
                term = tl.where(middle, inside, tl.where(x < LOW, BELOW, ABOVE))
            acc += tl.where(mask, term * g, 0.0)
        tl.store(ga_ptr + row, (tl.sum(acc, axis=0) * grad_scale).to(ga_ptr.dtype.element_ty))


def _triton_constants(grid: Grid) -> tuple[dict, dict]:
    b = ste_bounds(grid)
    return dict(EPS=ALPHA_EPS, METHOD=_METHOD_ID[grid.method], N=b.seq_levels, SHIFT=b.seq_shift, LOW=b.low,
                HIGH=b.high, CLIP=SEQ_CLIP), dict(BELOW=b.below, ABOVE=b.above)


_FORWARD_BLOCK = 1024
_BACKWARD_BLOCK = 1024


def _triton_forward(weight: torch.Tensor, alpha: torch.Tensor, grid: Grid, out_dtype: torch.dtype) -> torch.Tensor:
    forward_kernel = _forward_kernel
    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=out_dtype, device=weight.device)
    consts, _ = _triton_constants(grid)
    forward_kernel[(rows, triton_cdiv(cols, _FORWARD_BLOCK))](weight, alpha, out, cols, **consts,
                                                             BLOCK=_FORWARD_BLOCK)
    return out


def _triton_backward(grad_output: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, grid: Grid,
                     grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    backward_kernel = _backward_kernel
    rows, cols = weight.shape
    grad_weight = torch.empty_like(weight)
    grad_alpha = torch.empty_like(alpha)
    consts, extra = _triton_constants(grid)
    backward_kernel[(rows,)](grad_output, weight, alpha, grad_weight, grad_alpha, grad_scale, cols, **consts,
                             **extra, BLOCK=_BACKWARD_BLOCK)
    return grad_weight, grad_alpha


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_available() -> bool:
    return triton is not None


# ------------------------------------------------------------------------------------------ the function

BACKENDS = ("auto", "triton", "inductor")


class FusedParetoQFakeQuant(torch.autograd.Function):
    """ParetoQ fake quantization with one-pass forward and backward kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, alpha: torch.Tensor, grid: Grid, out_dtype: torch.dtype,
                backend: str) -> torch.Tensor:
        ctx.save_for_backward(weight, alpha)
        ctx.grid, ctx.backend = grid, backend
        if backend == "triton":
            return _triton_forward(weight.detach().contiguous(), alpha.detach().contiguous(), grid, out_dtype)
        forward_kernel, _ = compiled_kernels(grid)
        return forward_kernel(weight.detach(), alpha.detach(), out_dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, alpha = ctx.saved_tensors
        grid: Grid = ctx.grid
        grad_scale = 1.0 / math.sqrt(weight.numel() * grid.grad_qp)
        if ctx.backend == "triton":
            grad_weight, grad_alpha = _triton_backward(grad_output.contiguous(), weight.detach().contiguous(),
                                                       alpha.detach().contiguous(), grid, grad_scale)
            return grad_weight, grad_alpha, None, None, None
        _, backward_kernel = compiled_kernels(grid)
        grad_weight, grad_alpha = backward_kernel(grad_output.contiguous(), weight.detach(), alpha.detach())
        return grad_weight, (grad_alpha * grad_scale).to(alpha.dtype), None, None, None


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto: Triton on CUDA when triton imports (a kernel launch costs ~20 us of CPU against ~200-400 us for a
    torch.compile'd call, which made QAT CPU-bound on small models), else the inductor-compiled kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"fused backend {backend!r} is unknown: choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "inductor"
    return backend


def fused_fake_quantize(weight: torch.Tensor, alpha: torch.Tensor, grid: Grid,
                        out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """ParetoQ fake quantization of a 2-D weight with per-row alpha [out, 1], returned in ``out_dtype`` (default:
    the weight's dtype). Same values and gradients as ``qat.quantizers.fake_quantize`` up to float rounding.
    backend: "triton" (hand-written kernels), "inductor" (torch.compile of the formulas) or "auto"."""
    return FusedParetoQFakeQuant.apply(weight, alpha, grid, out_dtype or weight.dtype,
                                       resolve_backend(backend, weight.device))


def fused_default(device: torch.device | str) -> bool:
    """Fused by default on CUDA only (Triton kernels, compiled in about a second). On CPU the fused path is the
    inductor C++ build: 5-40 s per grid on first use on the 2-core CI machine (the first grid also pays for
    loading inductor), and each compiled call costs more CPU than the ~20 tiny eager kernels it replaces at
    test-model sizes, so on CPU it is slower overall; the speed-up is a GPU matter (memory bandwidth)."""
    return torch.device(device).type == "cuda"


def set_fused(model: nn.Module, on: bool) -> dict[nn.Module, bool]:
    """Switch every quantized module of ``model`` to the fused (True) or reference (False) fake-quant; returns the
    previous settings for ``restore_fused``. A module takes part by declaring a class attribute ``fused: bool``
    (qat.modules.QuantLinear / QuantEmbedding do): qat.modules imports this module, never the reverse."""
    previous = {}
    for module in model.modules():
        if isinstance(getattr(type(module), "fused", None), bool):
            previous[module] = module.fused
            module.fused = on
    return previous


def restore_fused(previous: dict[nn.Module, bool]) -> None:
    for module, on in previous.items():
        module.fused = on
