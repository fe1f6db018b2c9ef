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


class QuantLinear(nn.Linear):
    """nn.Linear whose weight is ParetoQ fake-quantized per output row in the forward.

    The latent weight stays in its own dtype (fp32 master weights for AdamW); the quantized weight is cast to the
    input dtype, so the matmul runs in bf16 under CUDA autocast. Unlike the reference, the bias is kept.

    ``fused`` (set by the trainer from TrainConfig.fused, or ``qat.fused.set_fused``) selects the compiled one-pass
    fake-quant of ``qat.fused``, which writes the quantized weight directly in the matmul's dtype; False (the
    default) runs the reference autograd function.
    """

    fused: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: float | str, **factory) -> None:
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.grid: Grid = grid_for_bits(bits)
        self.alpha = nn.Parameter(torch.ones(out_features, 1, device=self.weight.device, dtype=torch.float32))

    @property
    def bits(self) -> float:
        return self.grid.bits

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: float | str) -> "QuantLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight  # share the Parameter: keeps ties (e.g. lm_head <-> embeddings) intact
        module.bias = linear.bias
        module.grid = grid_for_bits(bits)
        module.alpha = nn.Parameter(init_alpha(linear.weight, module.grid).to(linear.weight.device))
        return module

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.alpha, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.linear(x, fused_fake_quantize(self.weight, self.alpha, self.grid,
                                                   _matmul_dtype(x)), self.bias)
        w = self.quantized_weight()
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.grid.bits}, grid={self.grid.name}"


class QuantEmbedding(nn.Embedding):
    """nn.Embedding with a 4- or 8-bit LSQ grid per token row (a size option; ParetoQ keeps embeddings float)."""

    fused: bool = False  # as QuantLinear.fused (the lookup itself does not autocast: the table keeps its dtype)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: float | str) -> "QuantEmbedding":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(module, attr, getattr(emb, attr))
        module.weight = emb.weight
        module.grid = grid_for_bits(bits)
        if module.grid.method != "lsq":
            raise ValueError(f"embeddings take 4 or 8 bits, not {bits}")
        module.alpha = nn.Parameter(init_alpha(emb.weight, module.grid).to(emb.weight.device))
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
        return F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.grid.bits}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)
