"""Quantized drop-in modules: linear layers (biases kept) and embeddings with a learnable alpha per row, or per group
of ``group_size`` consecutive columns of a row.

A per-group quantizer IS the per-row quantizer applied to the weight viewed as [out * in / G, G] with alpha
[out * in / G, 1]: fake_quantize, init_alpha, quantize_codes and the fused kernels all work per row already, and
ParetoQ's grad_scale = 1 / sqrt(numel * Qp) counts the whole tensor, which the view does not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.fused import fused_fake_quantize
from qat.grids import Grid, grid_for_bits
from qat.quantizers import fake_quantize, init_alpha


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, w) runs in: the autocast dtype when autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


GROUP_SIZES = (32, 64, 128, 256)  # what the runtimes hold natively (GGUF Q4_0 32, 256-block types, MatMulNBits, 8da4w)


def check_group_size(group_size: int | None, row_length: int, name: str = "module") -> None:
    """One line naming the module and the group sizes that work when ``group_size`` does not divide its rows."""
    if group_size is None:
        return
    if group_size <= 0 or row_length % group_size:
        works = [g for g in GROUP_SIZES if row_length % g == 0]
        raise ValueError(
            f"group size {group_size} does not divide {name}'s rows of {row_length}: use "
            + (f"{', '.join(map(str, works))} or " if works else "")
            + "no group size (one step per row)"
        )


def grouped_rows(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The weight as the rows its alphas scale: itself per row, the [out * in / G, G] view per group."""
    if group_size is None or group_size == weight.shape[-1]:
        return weight
    return weight.reshape(-1, group_size)


class _GroupedQuant:
    """What QuantLinear and QuantEmbedding share: the grouped view around the per-row quantizers."""

    weight: torch.Tensor
    alpha: torch.Tensor
    grid: Grid
    group_size: int | None = None  # None: one alpha per row (ParetoQ's setting)

    def _init_quant(self, bits: float | str, alpha_init: str, group_size: int | None) -> None:
        check_group_size(group_size, self.weight.shape[1], type(self).__name__)
        self.grid = grid_for_bits(bits)
        self.group_size = None if group_size == self.weight.shape[1] else group_size
        rows = grouped_rows(self.weight, self.group_size)
        self.alpha = nn.Parameter(init_alpha(rows, self.grid, alpha_init).to(self.weight.device))

    @property
    def bits(self) -> float:
        return self.grid.bits

    def grouped_weight(self) -> torch.Tensor:
        return grouped_rows(self.weight, self.group_size)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.grouped_weight(), self.alpha, self.grid).reshape(self.weight.shape)

    def _fused_weight(self, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return fused_fake_quantize(self.grouped_weight(), self.alpha, self.grid, out_dtype).reshape(self.weight.shape)

    def _quant_repr(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.grid.bits}, grid={self.grid.name}{groups}"


def blended(latent: torch.Tensor, quantized: torch.Tensor, blend: float) -> torch.Tensor:
    """latent + blend * (quantized - latent), in the quantized weight's dtype; the quantized weight itself at 1.

    Gradients: (1 - blend) of the output gradient reaches the latent weight directly, blend of it through the
    quantizer's straight-through estimator; alpha gets blend times its quantizer gradient.
    """
    if blend >= 1.0:
        return quantized
    return torch.lerp(latent.to(quantized.dtype), quantized, blend)


class QuantLinear(_GroupedQuant, nn.Linear):
    """nn.Linear whose weight is ParetoQ fake-quantized per output row (or per group of G columns) in the forward.

    The latent weight stays in its own dtype (fp32 master weights for AdamW); the quantized weight is cast to the
    input dtype, so the matmul runs in bf16 under CUDA autocast. Unlike the reference, the bias is kept.

    ``fused`` (set by the trainer from TrainConfig.fused, or ``qat.fused.set_fused``) selects the compiled one-pass
    fake-quant of ``qat.fused``, which writes the quantized weight directly in the matmul's dtype; False (the
    default) runs the reference autograd function.
    """

    fused: bool = False
    # Soft-to-hard annealing (qat.recipe): the forward uses w + blend * (Q(w) - w). 1.0 (the default, and the
    # paper's recipe) is plain fake quantization; the trainer ramps it up from 0 when TrainConfig.anneal_frac > 0.
    blend: float = 1.0

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: float | str,
                 group_size: int | None = None, **factory) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **factory)
        self._init_quant(bits, "paper", group_size)
        with torch.no_grad():
            self.alpha.fill_(1.0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: float | str, alpha_init: str = "paper",
                    group_size: int | None = None) -> "QuantLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight  # share the Parameter: keeps ties (e.g. lm_head <-> embeddings) intact
        module.bias = linear.bias
        module._init_quant(bits, alpha_init, group_size)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            w = self._fused_weight(_matmul_dtype(x))
            return F.linear(x, blended(self.weight, w, self.blend), self.bias)
        w = blended(self.weight, self.quantized_weight(), self.blend)
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"


class QuantEmbedding(_GroupedQuant, nn.Embedding):
    """nn.Embedding with a 4- or 8-bit LSQ grid per token row or per group of G columns (a size option; ParetoQ
    keeps embeddings float)."""

    fused: bool = False  # as QuantLinear.fused (the lookup itself does not autocast: the table keeps its dtype)
    blend: float = 1.0  # as QuantLinear.blend

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: float | str, alpha_init: str = "paper",
                       group_size: int | None = None) -> "QuantEmbedding":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(module, attr, getattr(emb, attr))
        module.weight = emb.weight
        if grid_for_bits(bits).method != "lsq":
            raise ValueError(f"embeddings take 4 or 8 bits, not {bits}")
        module._init_quant(bits, alpha_init, group_size)
        # Gemma's scaled embedding multiplies the lookup by sqrt(hidden): the factor stays (not a weight: never
        # quantized or saved, as in Gemma3TextScaledWordEmbedding)
        if getattr(emb, "embed_scale", None) is not None:
            module.register_buffer("embed_scale", emb.embed_scale.detach().clone(), persistent=False)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self._fused_weight() if self.fused else self.quantized_weight()
        weight = blended(self.weight, weight, self.blend)
        out = F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        scale = getattr(self, "embed_scale", None)
        return out if scale is None else out * scale.to(out.dtype)  # in the table's dtype, as transformers does

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self._quant_repr()}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)


def set_blend(model: nn.Module, blend: float) -> None:
    """Set the soft-to-hard blend of every quantized module (1.0: the quantized model itself)."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    for module in model.modules():
        if isinstance(module, QUANT_MODULES):
            module.blend = float(blend)
