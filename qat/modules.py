"""Quantized drop-in modules: linear layers (biases kept) and embeddings with a learnable per-row alpha."""

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


def blended(latent: torch.Tensor, quantized: torch.Tensor, blend: float) -> torch.Tensor:
    """latent + blend * (quantized - latent), in the quantized weight's dtype; the quantized weight itself at 1.

    Gradients: (1 - blend) of the output gradient reaches the latent weight directly, blend of it through the
    quantizer's straight-through estimator; alpha gets blend times its quantizer gradient.
    """
    if blend >= 1.0:
        return quantized
    return torch.lerp(latent.to(quantized.dtype), quantized, blend)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight is ParetoQ fake-quantized per output row in the forward.

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

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: float | str, **factory) -> None:
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.grid: Grid = grid_for_bits(bits)
        self.alpha = nn.Parameter(torch.ones(out_features, 1, device=self.weight.device, dtype=torch.float32))

    @property
    def bits(self) -> float:
        return self.grid.bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: float | str, alpha_init: str = "paper") -> "QuantLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight  # share the Parameter: keeps ties (e.g. lm_head <-> embeddings) intact
        module.bias = linear.bias
        module.grid = grid_for_bits(bits)
        module.alpha = nn.Parameter(init_alpha(linear.weight, module.grid, alpha_init).to(linear.weight.device))
        return module

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.alpha, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            w = fused_fake_quantize(self.weight, self.alpha, self.grid, _matmul_dtype(x))
            return F.linear(x, blended(self.weight, w, self.blend), self.bias)
        w = blended(self.weight, self.quantized_weight(), self.blend)
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.grid.bits}, grid={self.grid.name}"


class QuantEmbedding(nn.Embedding):
    """nn.Embedding with a 4- or 8-bit LSQ grid per token row (a size option; ParetoQ keeps embeddings float)."""

    fused: bool = False  # as QuantLinear.fused (the lookup itself does not autocast: the table keeps its dtype)
    blend: float = 1.0  # as QuantLinear.blend

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: float | str, alpha_init: str = "paper") -> "QuantEmbedding":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(module, attr, getattr(emb, attr))
        module.weight = emb.weight
        module.grid = grid_for_bits(bits)
        if module.grid.method != "lsq":
            raise ValueError(f"embeddings take 4 or 8 bits, not {bits}")
        module.alpha = nn.Parameter(init_alpha(emb.weight, module.grid, alpha_init).to(emb.weight.device))
        # keep any subclass behaviour (e.g. Gemma's scaled embedding) out of scope: plain lookup only
        return module

    @property
    def bits(self) -> float:
        return self.grid.bits

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.alpha, self.grid)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = (fused_fake_quantize(self.weight, self.alpha, self.grid) if self.fused
                  else self.quantized_weight())
        weight = blended(self.weight, weight, self.blend)
        return F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.grid.bits}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)


def set_blend(model: nn.Module, blend: float) -> None:
    """Set the soft-to-hard blend of every quantized module (1.0: the quantized model itself)."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    for module in model.modules():
        if isinstance(module, QUANT_MODULES):
            module.blend = float(blend)
