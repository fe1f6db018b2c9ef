"""From what qat/ produces to the canonical checkpoint: a trained (or RTN) QAT model, a float model, a ParetoQ
reference training checkpoint, or a model whose weights already sit on a grid.

The checkpoint itself (paretoq_export.canonical.checkpoint) only holds, reads and writes codes and steps; the code
that derives them from latent weights and alphas lives here, beside the quantizers that define that arithmetic.

    ckpt = QATCheckpoint.from_qat_model(model, tokenizer, recipe={...})
    ckpt.save("ckpt")          # a QuantizedCheckpoint like any other
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paretoq_export.canonical.checkpoint import (
    FLOAT_DTYPES, CheckpointError, QuantizedCheckpoint, QuantizedTensor, saved_tokenizer_files, to_float_dtype,
)
from paretoq_export.canonical.grids import Grid, grid_for_bits
from qat.prepare import DECODER_LINEARS, QATConfig, quantized_modules
from qat.quantizers import alpha_to_step, quantize_codes


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / FSDP wrappers
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def _float_tensors_and_config(model: nn.Module, skip: set[str], float_dtype: str) -> tuple[dict, dict]:
    """Every tensor of the model not in ``skip`` (alphas and a tied lm_head excluded) in ``float_dtype``, and the
    model config without any quantization_config."""
    skip = set(skip)
    if getattr(model.config, "tie_word_embeddings", False):
        skip.add("lm_head.weight")  # the shared table is stored once, under the embedding's name
    dtype = FLOAT_DTYPES[float_dtype]
    tensors = {k: to_float_dtype(k, v.cpu(), dtype) for k, v in model.state_dict().items()
               if k not in skip and not k.endswith(".alpha")}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return tensors, config


class QATCheckpoint(QuantizedCheckpoint):
    """The canonical checkpoint with its constructors from models: every classmethod returns a checkpoint that
    saves, loads and exports like any QuantizedCheckpoint."""

    @classmethod
    def from_qat_model(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        recipe: dict | None = None,
        float_dtype: str = "float16",
    ) -> "QATCheckpoint":
        """Derive codes and fp16 steps once from a prepare()'d model's latent weights and trained alphas."""
        model = _unwrap(model)
        modules = quantized_modules(model)
        if not modules:
            raise CheckpointError("the model has no ParetoQ modules: run qat.prepare(model, QATConfig(...)) first")
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        quantized: dict[str, QuantizedTensor] = {}
        for name, module in modules.items():
            key = f"{name}.weight"
            if tied and module is model.get_output_embeddings():
                continue  # the shared table is stored once, under the embedding's name
            # a group quantizer is the row quantizer on the [out * in / G, G] view: codes back to [out, in],
            # steps to [out, in / G] (or [out] per row)
            weight = module.weight.detach()
            codes = quantize_codes(module.grouped_weight().detach(), module.alpha.detach(), module.grid)
            step = alpha_to_step(module.alpha, module.grid).reshape(weight.shape[0], -1)
            quantized[key] = QuantizedTensor(codes.reshape(weight.shape).cpu(), step.cpu(), module.grid)
        tensors, config = _float_tensors_and_config(model, skip=set(quantized), float_dtype=float_dtype)
        full_recipe = dict(recipe or {})
        qat_config = getattr(model, "_paretoq_config", None)
        if qat_config is not None:
            full_recipe.setdefault("qat_config", qat_config.to_json())
        if getattr(model, "_paretoq_stored_bits", None) is not None:  # --target: the bits per weight it stores
            full_recipe.setdefault("stored_bits", model._paretoq_stored_bits)
        full_recipe.setdefault("float_dtype", float_dtype)
        return cls(config, quantized, tensors, saved_tokenizer_files(tokenizer), full_recipe)

    @classmethod
    def from_float_model(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        recipe: dict | None = None,
        float_dtype: str = "float16",
    ) -> "QATCheckpoint":
        """An unquantized model in checkpoint form (no quantized modules): the float baseline that exporters turn
        into F16 / Q8_0 files for size, speed and accuracy comparisons."""
        model = _unwrap(model)
        if quantized_modules(model):
            raise CheckpointError("the model has ParetoQ modules: use QuantizedCheckpoint.from_qat_model")
        tensors, config = _float_tensors_and_config(model, skip=set(), float_dtype=float_dtype)
        full_recipe = {"method": "float", **(recipe or {}), "float_dtype": float_dtype}
        return cls(config, {}, tensors, saved_tokenizer_files(tokenizer), full_recipe)

    @classmethod
    def from_paretoq_reference(
        cls,
        state_dict: dict[str, torch.Tensor],
        config: dict,
        bits: float | str,
        tokenizer: Any = None,
        float_dtype: str = "float16",
    ) -> "QATCheckpoint":
        """Import a ParetoQ reference training checkpoint: latent ``weight`` plus ``weight_clip_val`` per linear.

        ``bits`` is the run's ``w_bits`` (0 means ternary there). Codes are derived with the reference forward.
        """
        grid = grid_for_bits(bits)
        clip_keys = [k for k in state_dict if k.endswith(".weight_clip_val")]
        if not clip_keys:
            raise CheckpointError(
                "no '*.weight_clip_val' tensors found: this is not a ParetoQ reference training checkpoint "
                "(for weights already on the grid use `paretoq-export import --kind on-grid`)"
            )
        quantized = {}
        for clip_key in clip_keys:
            key = clip_key[: -len("_clip_val")]
            if key not in state_dict:
                raise CheckpointError(f"{clip_key} has no matching {key}: the checkpoint is incomplete")
            weight, alpha = state_dict[key].float(), state_dict[clip_key].float().reshape(-1, 1)
            quantized[key] = QuantizedTensor(quantize_codes(weight, alpha, grid), alpha_to_step(alpha, grid), grid)
        skip = set(quantized) | set(clip_keys)
        if config.get("tie_word_embeddings"):
            skip.add("lm_head.weight")
        dtype = FLOAT_DTYPES[float_dtype]
        tensors = {k: to_float_dtype(k, v, dtype) for k, v in state_dict.items() if k not in skip}
        recipe = {"imported_from": "paretoq-reference", "w_bits": grid.bits, "float_dtype": float_dtype}
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        return cls(config, quantized, tensors, saved_tokenizer_files(tokenizer), recipe)

    @classmethod
    def from_on_grid_model(
        cls,
        model: nn.Module,
        bits: float | str,
        tokenizer: Any = None,
        target_modules: tuple[str, ...] = DECODER_LINEARS,
        overrides: dict[str, float] | None = None,
        float_dtype: str = "float16",
    ) -> "QATCheckpoint":
        """Import a model whose target linears already hold grid values (e.g. MobileLLM-ParetoQ in bf16).

        Each row's codes and step are recovered; a row with more distinct values than the grid has levels, or
        values off the grid by more than bf16 rounding, is an error naming the module and row.
        """
        qcfg = QATConfig(bits=bits, target_modules=target_modules, overrides=overrides or {})
        state = model.state_dict()
        quantized = {}
        for name, module in model.named_modules():
            if type(module) is nn.Linear and name.split(".")[-1] in target_modules:
                grid = grid_for_bits(qcfg.bits_for(name))
                quantized[f"{name}.weight"] = recover_grid_codes(module.weight.detach(), grid, name)
        if not quantized:
            raise CheckpointError(f"no {'/'.join(target_modules)} linears in {type(model).__name__}")
        skip = set(quantized)
        if getattr(model.config, "tie_word_embeddings", False):
            skip.add("lm_head.weight")
        dtype = FLOAT_DTYPES[float_dtype]
        tensors = {k: to_float_dtype(k, v, dtype) for k, v in state.items() if k not in skip}
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        recipe = {"imported_from": "on-grid", "qat_config": qcfg.to_json(), "float_dtype": float_dtype}
        return cls(config, quantized, tensors, saved_tokenizer_files(tokenizer), recipe)


def recover_grid_codes(weight: torch.Tensor, grid: Grid, name: str = "weight") -> QuantizedTensor:
    """Recover per-row (codes, fp16 step) of a weight whose rows already hold values of ``grid``.

    The step is fitted per row: try each level magnitude as the row's largest |w|, keep the candidate whose
    codes reproduce the row best, then refine s by least squares and round it to fp16.
    """
    w = weight.detach().float()
    sorted_w = w.sort(dim=-1).values
    distinct = 1 + (sorted_w[:, 1:] != sorted_w[:, :-1]).sum(dim=-1)
    bad = torch.nonzero(distinct > grid.n_codes).flatten()
    if len(bad):
        r = int(bad[0])
        raise CheckpointError(
            f"{name} row {r} has {int(distinct[r])} distinct values but the {grid.name} grid has {grid.n_codes}: "
            f"these weights are not {grid.bits}-bit (pick the right --bits, or run `quantize`/`qat`)"
        )
    amax = w.abs().amax(dim=-1, keepdim=True)
    magnitudes = sorted({abs(q - grid.zero) for q in range(grid.n_codes)} - {0.0})
    best_err, best_codes = None, None
    for m in magnitudes:  # candidate: the row's largest |w| sits at level magnitude m
        s = torch.where(amax > 0, amax / m, torch.ones_like(amax))
        codes = torch.round(w / s + grid.zero).clamp(0, grid.n_codes - 1)
        err = ((codes - grid.zero) * s - w).abs().amax(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_codes = err, codes
        else:
            better = err <= best_err  # ties go to the finer step
            best_err = torch.where(better, err, best_err)
            best_codes = torch.where(better, codes, best_codes)
    centred = best_codes - grid.zero
    denom = (centred * centred).sum(dim=-1, keepdim=True)
    step = torch.where(denom > 0, (w * centred).sum(dim=-1, keepdim=True) / denom.clamp_min(1e-30), 0.0)
    step16 = step.reshape(-1).to(torch.float16)
    deviation = (centred * step16.float().reshape(-1, 1) - w).abs().amax(dim=-1) / amax.reshape(-1).clamp_min(1e-30)
    tol = 2.0**-7  # bf16 stores 8 significant bits: grid values rounded to bf16 deviate by < 2^-8 relative
    worst = int(deviation.argmax())
    if deviation[worst] > tol:
        raise CheckpointError(
            f"{name} row {worst} is off the {grid.name} grid (max deviation {float(deviation[worst]):.2e} of the "
            f"row's max): these weights are not {grid.bits}-bit, pick the right --bits"
        )
    return QuantizedTensor(best_codes.to(torch.uint8), step16, grid)
