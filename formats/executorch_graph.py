"""Rewrites that keep each decoder layer inside few XNNPACK delegates (same math, XNNPACK-supported ops).

With a dynamic token count, XNNPACK refuses three things transformers' Llama/Qwen graphs are full of:
``mean`` over the last dim of a 3-D tensor (RMSNorm), ``slice`` of a dynamic tensor (rotate_half in RoPE), and
``view`` whose shape names the symbolic length (``view(1, T, -1, head_dim)``). Each refusal cuts the layer into
another delegate, and lowering costs ~2 s per delegate here: SmolLM2's 30 layers took minutes. So:

- RMSNorm computes its mean as a 4-D average over the last two dims (XNNPACK global average pooling);
- rotate_half is x @ R with R the fixed signed permutation [-x2, x1] (each output is one +-x, so it is exact);
- views get their one symbolic dim written as -1 and their -1 written as its static value (graph pass).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator

import torch
from torch import nn

from paretoq_export.canonical.model_description import ModelDescription


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last dim, keepdim, as a 4-D average pooling."""
    sq = x.pow(2).reshape(1, -1, x.shape[-1], 1)
    return sq.mean(dim=(2, 3), keepdim=True).reshape(*x.shape[:-1], 1)


def _rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm forward with the mean as a 4-D pooling."""
    dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    x = x * torch.rsqrt(_mean_square(x) + self.variance_epsilon)
    return self.weight * x.to(dtype)


def _offset_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' Gemma3RMSNorm forward ((1 + weight) in float32) with the mean as a 4-D pooling."""
    x = hidden_states.float()
    x = x * torch.rsqrt(_mean_square(x) + self.eps)
    return (x * (1.0 + self.weight.float())).type_as(hidden_states)


def _rotation(dim: int) -> torch.Tensor:
    """R with x @ R == cat(-x[..., dim/2:], x[..., :dim/2])."""
    half = dim // 2
    r = torch.zeros(dim, dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def _rotate_half_by(model: nn.Module):
    """rotate_half as one linear per head, R^T held as a buffer of the model (a lifted constant tensor breaks
    ExecuTorch's delegate unlifting)."""
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, model.et_rope_rotation)

    return rotate_half


@contextlib.contextmanager
def xnnpack_friendly(model: nn.Module) -> Iterator[None]:
    """While exporting: RMSNorm modules use ``_rms_norm`` (``_offset_rms_norm`` for Gemma's (1 + w) norms) and the
    model's modeling module rotates with a linear."""
    from paretoq_export.canonical.model_description import ModelDescription

    offset = ModelDescription.from_config(model.config.to_dict()).family.norm_offset
    forward = _offset_rms_norm if offset else _rms_norm
    epsilon = "eps" if offset else "variance_epsilon"
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, epsilon)]
    modeling = sys.modules[type(model).__module__]
    original = getattr(modeling, "rotate_half", None)
    for m in norms:
        m.forward = types.MethodType(forward, m)
    if original is not None:
        # rotate_half sees the rotated part of each head only: rotary_dim (Phi-4-mini's partial rotary), not head_dim
        rotary_dim = ModelDescription.from_config(model.config.to_dict()).rotary_dim
        model.register_buffer("et_rope_rotation", _rotation(rotary_dim).T.contiguous(), persistent=False)
        modeling.rotate_half = _rotate_half_by(model)
    try:
        yield
    finally:
        for m in norms:
            del m.forward
        if original is not None:
            modeling.rotate_half = original
            del model.et_rope_rotation


def views_with_inferred_dim(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """view/reshape nodes with exactly one symbolic dim: that dim becomes -1 and any -1 its static size, which
    XNNPACK's static_reshape accepts (it refuses shapes naming a symbol)."""
    targets = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in targets or "val" not in node.meta:
            continue
        out_shape = node.meta["val"].shape
        shape = list(node.args[1])
        symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(symbolic) != 1 or len(shape) != len(out_shape):
            continue
        static = [i for i in range(len(shape)) if i != symbolic[0]]
        if not all(isinstance(out_shape[i], int) for i in static):
            continue
        new_shape = [int(out_shape[i]) if i in static else -1 for i in range(len(shape))]
        node.args = (node.args[0], new_shape, *node.args[2:])
    program.graph.eliminate_dead_code()
    program.graph_module.recompile()
    return program
