"""Exact integer containers for ExecuTorch: the checkpoint's codes and steps as torchao ``IntxUnpackedToInt8Tensor``.

Every ParetoQ grid is w = s * (q - z) per row (DESIGN.md section 2). torchao's tensor dequantizes
``(qdata - zero_point) * scale`` with signed ``qdata`` in the range of ``target_dtype``, so each grid maps to
integers ``k * (q - z)`` and step ``s / k`` with k = 2 where z is a half-integer (binary, 2-bit SEQ):

    target x86 (XNNPACK runs linears only at 4 or 8 bits): every weight grid in int4, zero point 0
    (XNNPACK's int4 path -- qb4w -- stores the per-row scale as bf16: codes exact, each row's step rounded to 8
    mantissa bits, at most 2^-9 relative; target x86-int8 puts the same integers in int8, where XNNPACK keeps fp32
    per-channel scales: bit-exact, twice the linear bytes)
        binary  {0,1}    -> {-1, +1}            step s/2      ternary {0,1,2} -> {-1, 0, 1}     step s
        seq2    {0..3}   -> {-3, -1, +1, +3}    step s/2      lsq3    {0..7}  -> {-4..3}        step s
        lsq4    {0..15}  -> {-8..7}             step s        lsq8 (embedding / lm_head) -> int8
    target arm64 (torchao's 1-8 bit lowbit kernels): the true bit width
        binary -> int1 {-1, 0}, zero point -0.5, step s        ternary -> int2 {-1, 0, 1}, step s
        seq2   -> int2 {-2..1}, zero point -0.5, step s        lsq3 -> int3, lsq4 -> int4

Both scalings are exact in float32: s is fp16, so s/2 is exact, and the products are the same real numbers as
s * (q - z), rounded once. ``verify_eager_weights`` proves it tensor by tensor.

Per-group steps (one per G consecutive columns, ``QuantizedTensor.scale`` [out, in // G]) become the tensor's
block size (1, G): XNNPACK runs them as int4 groups (qb4w, bf16 scales) when G is a multiple of 32
(executorch/backends/xnnpack/operators/node_visitor.py); it has no 8-bit groupwise weights, so x86-int8 refuses
them (``check_groups``), as does the quantized embedding lookup (per-row tables only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paretoq_export.canonical.grids import GRIDS, Grid, integer_form

TARGETS = ("x86", "x86-int8", "arm64")


@dataclass(frozen=True)
class Container:
    """How one grid sits in a signed integer container: qdata = mult * (q - z) + offset, scale = s / mult,
    zero_point = offset (so that (qdata - zero_point) * scale = s * (q - z))."""

    dtype: torch.dtype
    mult: int
    offset: float = 0.0

    @property
    def bits(self) -> int:
        return int(str(self.dtype).removeprefix("torch.int"))


class ContainerError(ValueError):
    """A grid or target the ExecuTorch exporter cannot hold exactly; one line naming the problem and the fix."""


def container_for(grid: Grid, target: str = "x86") -> Container:
    """x86: the grid's integer form (canonical.grids.integer_form) in int4 where it fits, else int8; x86-int8: the
    same integers in int8. arm64: the true code width, half-integer levels shifted by -0.5 into the zero point."""
    if target not in TARGETS:
        raise ContainerError(f"unknown --target {target!r}: use one of {', '.join(TARGETS)}")
    if grid.name not in GRIDS:
        raise ContainerError(f"grid {grid.name} has no ExecuTorch container: re-quantize with bits 1, 1.58, 2, 3 or 4")
    if target == "arm64":
        return Container(getattr(torch, f"int{grid.code_bits}"), 1, -(grid.zero % 1))
    form = integer_form(grid)
    return Container(torch.int4 if target == "x86" and form.fits_signed(4) else torch.int8, form.mult)


XNNPACK_GROUP_MULTIPLE = 32  # qb4w group sizes XNNPACK accepts


def check_groups(key: str, group_size: int, in_features: int, target: str, is_linear: bool = True) -> None:
    """Refuse, in one line, a step layout the target cannot hold, before any lowering."""
    if group_size == in_features:
        # XNNPACK runs int4 per-row weights as one group of the row: it asserts after minutes of lowering otherwise
        if target == "x86" and is_linear and in_features % XNNPACK_GROUP_MULTIPLE:
            raise ContainerError(f"{key} is {in_features} wide, and XNNPACK's int4 weights need a multiple of "
                                 f"{XNNPACK_GROUP_MULTIPLE}: export with --target x86-int8 (int8 per row, any width)")
        return
    if not is_linear:
        raise ContainerError(f"{key} has per-group steps (G={group_size}); ExecuTorch's quantized embedding lookup "
                             "holds per-row steps only: quantize the embedding per row")
    if target == "x86-int8":
        raise ContainerError(f"{key} has per-group steps (G={group_size}) and XNNPACK has no 8-bit groupwise weights: "
                             "use --target x86 (int4 groups) or a per-row checkpoint for --target x86-int8")
    if target == "x86" and group_size % XNNPACK_GROUP_MULTIPLE:
        raise ContainerError(f"{key} has group size {group_size}, and XNNPACK's int4 groups must be a multiple of "
                             f"{XNNPACK_GROUP_MULTIPLE}: re-quantize with --group-size 32, 64, 128 or 256")


def intx_weight(codes: torch.Tensor, step: torch.Tensor, grid: Grid, target: str = "x86",
                dynamic_activations: bool = True) -> torch.Tensor:
    """One quantized weight [out, in] as an IntxUnpackedToInt8Tensor, exactly: per row (per channel) for steps
    [out], per group of G columns (block size (1, G)) for steps [out, in // G].

    ``dynamic_activations``: int8 asymmetric per-token activations (what XNNPACK's 8da4w kernels run);
    False for embedding tables (weight-only lookup)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQuant,
    )

    c = container_for(grid, target)
    centred = codes.to(torch.float32) - grid.zero  # half-integers for binary / seq2, exact
    qdata = centred * c.mult + c.offset
    lo, hi = -(2 ** (c.bits - 1)), 2 ** (c.bits - 1) - 1
    if qdata.min() < lo or qdata.max() > hi or not torch.equal(qdata, qdata.round()):
        raise ContainerError(f"{grid.name} codes do not fit {c.dtype}: the checkpoint is corrupt")
    rows, cols = codes.shape
    scale = (step.to(torch.float32) / c.mult).reshape(rows, -1)
    group = cols // scale.shape[1]
    if c.offset:
        zero_point = torch.full(scale.shape, c.offset, dtype=torch.float32)
    else:
        zero_point = torch.zeros(scale.shape, dtype=torch.int8)
    return IntxUnpackedToInt8Tensor(
        qdata.to(torch.int8), scale, zero_point, c.dtype, (1, group), torch.float32,
        ActQuant.INT8_ASYM_PER_TOKEN if dynamic_activations else None,
    )


def symmetric_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a float table to ``bits``-bit symmetric per-row codes (the lossy 4/8-bit embedding option):
    returns (codes as unsigned lsq-grid codes, fp16 step), so the result is a checkpoint-style QuantizedTensor."""
    qmax = 2 ** (bits - 1) - 1
    amax = weight.float().abs().amax(dim=1)
    step = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(torch.float16)
    q = torch.round(weight.float() / step.float().reshape(-1, 1)).clamp(-qmax - 1, qmax)
    return (q + 2 ** (bits - 1)).to(torch.uint8), step


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)


EMBED_KEY = "model.embed_tokens.weight"


def build_eager_model(ckpt, target: str = "x86", embedding_bits: int | None = None,
                      progress: bool | None = None) -> nn.Module:
    """The checkpoint's model with every quantized linear (and optionally the embedding table) holding an
    IntxUnpackedToInt8Tensor built from the codes and steps: what torch.export sees. Float tensors are those of
    ``ckpt.build_reference_model()``.

    ``embedding_bits`` (4/8) rounds a float embedding table to per-row symmetric codes (lossy, like GGUF's Q8_0
    token_embd); a tied lm_head then reads the same codes as an int8-activation linear, so the table is rounded
    once and the fp32 copy XNNPACK would otherwise pack for lm_head disappears too."""
    from tqdm.auto import tqdm

    from paretoq_export.canonical.checkpoint import QuantizedTensor
    from paretoq_export.canonical.grids import grid_for_bits

    model = ckpt.build_reference_model()
    quantized = dict(ckpt.quantized)
    if embedding_bits and EMBED_KEY not in quantized:
        grid = grid_for_bits(embedding_bits)
        codes, step = symmetric_rows(model.get_input_embeddings().weight.detach(), grid.code_bits)
        quantized[EMBED_KEY] = QuantizedTensor(codes, step, grid)
    if ckpt.tied and EMBED_KEY in quantized:
        model.config.tie_word_embeddings = False  # lookup table and output linear become separate tensors
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    disable = None if progress is None else not progress
    for key, q in tqdm(sorted(quantized.items()), desc="quantized weights", unit="tensor", disable=disable):
        module = model.get_submodule(key.removesuffix(".weight"))
        is_linear = isinstance(module, nn.Linear)
        check_groups(key, q.group_size, q.shape[1], target, is_linear)
        _set_weight(module, intx_weight(q.codes, q.scale, q.grid, target if is_linear else "x86", is_linear))
        # (embedding tables: lsq8/lsq4 lookups, the same container for every target)
        if key == EMBED_KEY:
            # padding_idx only shapes gradients, but it is an argument of aten.embedding that executorch's
            # quantized-embedding fusion pattern (embedding(dequantize_affine(...), ids)) does not have
            module.padding_idx = None
        if key == EMBED_KEY and ckpt.tied:
            _set_weight(model.lm_head, intx_weight(q.codes, q.scale, q.grid, "x86", dynamic_activations=True))
    return model.eval()


PTQ_SCHEMES = ("8da4w",)
PTQ_GROUP_SIZES = (256, 128, 64, 32)  # 8da4w weight groups XNNPACK runs (multiples of 32), largest first


def ptq_group_size(model: nn.Module) -> int:
    """The largest of PTQ_GROUP_SIZES dividing every linear's input width: every linear quantized (ExecuTorch's
    LLM export defaults to 128 and leaves the linears it does not divide in float, on SmolLM2 all but down_proj)."""
    widths = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    for group in PTQ_GROUP_SIZES:
        if all(w % group == 0 for w in widths):
            return group
    raise ContainerError(f"no 8da4w group size in {PTQ_GROUP_SIZES} divides every linear's input width "
                         f"({sorted(widths)}): XNNPACK's int4 groups cannot hold this model")


def torchao_8da4w(model: nn.Module) -> int:
    """torchao's own post-training 8da4w on every linear of a float model, in place, as ExecuTorch's LLM export
    configures it (Int8DynamicActivationIntxWeightConfig: int4 symmetric weights per group with affine qparams,
    int8 asymmetric per-token activations): the baseline a user gets without QAT. Returns the group size."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    group = ptq_group_size(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the float lookup table stays; lm_head gets its own int4 weight
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group))
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear))
    return group


def verify_eager_weights(model: nn.Module, ckpt) -> dict:
    """Every quantized weight of ``model`` dequantizes to exactly the checkpoint's s * (q - z) (float32)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    checked = 0
    for key, q in ckpt.quantized.items():
        weight = model.get_submodule(key.removesuffix(".weight")).weight
        if not isinstance(weight, IntxUnpackedToInt8Tensor):
            raise ContainerError(f"{key} is not an IntxUnpackedToInt8Tensor in the eager model")
        got, want = weight.dequantize(), q.dequantize()
        if not torch.equal(got, want):
            bad = tuple(int(i) for i in torch.nonzero(got != want)[0])
            raise ContainerError(f"{key} differs from the checkpoint at {bad}: {float(got[bad])!r} != "
                                 f"{float(want[bad])!r}")
        checked += 1
    return {"tensors": checked, "exact": checked}
