"""The canonical quantized checkpoint: integer codes + per-row fp16 step + grid. Every exporter reads only this.

On disk it is a transformers-style directory:

    config.json          the model's config plus ``quantization_config`` (quant_method "paretoq", per-module grid)
    model.safetensors    ``<module>.qweight`` uint8 bit-packed codes [out, ceil(in * code_bits / 8)]
                         ``<module>.scales``  fp16 per-row step s [out]
                         every unquantized tensor (embeddings, norms, biases, lm_head) in ``float_dtype``
    tokenizer files      as the tokenizer's save_pretrained writes them

A quantized weight is ``w[r, c] = scales[r] * (code[r, c] - zero)`` with the grid's zero (DESIGN.md section 2),
evaluated in float32, where it is exact. Directories are written to a temporary sibling and renamed into place,
and config.json records the sha256 of the weights, so a half-written or corrupted checkpoint never loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from paretoq_export.atomic import atomic_dir
from paretoq_export.packing import pack_codes, packed_row_bytes, unpack_codes
from qat.grids import GRIDS, Grid, grid_for_bits
from qat.prepare import DECODER_LINEARS, quantized_modules
from qat.quantizers import alpha_to_step, dequantize_codes, quantize_codes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
QUANT_METHOD = "paretoq"
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message is one line naming the problem and the fix."""


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [out, in], values < grid.n_codes
    scale: torch.Tensor  # float16 [out]: the step s per row
    grid: Grid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.grid)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / FSDP wrappers
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _to_float_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor.contiguous()
    out = tensor.detach().to(dtype)
    if not torch.isfinite(out).all():
        raise CheckpointError(f"tensor {name} overflows {dtype}: save with float_dtype='float32' (--float-dtype)")
    return out.contiguous()


def _float_tensors_and_config(model: nn.Module, skip: set[str], float_dtype: str) -> tuple[dict, dict]:
    """Every tensor of the model not in ``skip`` (alphas and a tied lm_head excluded) in ``float_dtype``, and the
    model config without any quantization_config."""
    skip = set(skip)
    if getattr(model.config, "tie_word_embeddings", False):
        skip.add("lm_head.weight")  # the shared table is stored once, under the embedding's name
    dtype = _FLOAT_DTYPES[float_dtype]
    tensors = {k: _to_float_dtype(k, v.cpu(), dtype) for k, v in model.state_dict().items()
               if k not in skip and not k.endswith(".alpha")}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    return tensors, config


@dataclass
class QuantizedCheckpoint:
    config: dict  # the transformers config as a dict, without quantization_config
    quantized: dict[str, QuantizedTensor]  # parameter name ("...q_proj.weight") -> codes + steps
    tensors: dict[str, torch.Tensor]  # every other tensor of the state dict
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_qat_model(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        recipe: dict | None = None,
        float_dtype: str = "float16",
    ) -> "QuantizedCheckpoint":
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
            codes = quantize_codes(module.weight.detach(), module.alpha.detach(), module.grid)
            quantized[key] = QuantizedTensor(codes.cpu(), alpha_to_step(module.alpha, module.grid).cpu(), module.grid)
        tensors, config = _float_tensors_and_config(model, skip=set(quantized), float_dtype=float_dtype)
        full_recipe = dict(recipe or {})
        qat_config = getattr(model, "_paretoq_config", None)
        if qat_config is not None:
            full_recipe.setdefault("qat_config", qat_config.to_json())
        full_recipe.setdefault("float_dtype", float_dtype)
        return cls(config, quantized, tensors, _tokenizer_files(tokenizer), full_recipe)

    @classmethod
    def from_float_model(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        recipe: dict | None = None,
        float_dtype: str = "float16",
    ) -> "QuantizedCheckpoint":
        """An unquantized model in checkpoint form (no quantized modules): the float baseline that exporters turn
        into F16 / Q8_0 files for size, speed and accuracy comparisons."""
        model = _unwrap(model)
        if quantized_modules(model):
            raise CheckpointError("the model has ParetoQ modules: use QuantizedCheckpoint.from_qat_model")
        tensors, config = _float_tensors_and_config(model, skip=set(), float_dtype=float_dtype)
        full_recipe = {"method": "float", **(recipe or {}), "float_dtype": float_dtype}
        return cls(config, {}, tensors, _tokenizer_files(tokenizer), full_recipe)

    @classmethod
    def from_paretoq_reference(
        cls,
        state_dict: dict[str, torch.Tensor],
        config: dict,
        bits: float | str,
        tokenizer: Any = None,
        float_dtype: str = "float16",
    ) -> "QuantizedCheckpoint":
        """Import a ParetoQ reference training checkpoint: latent ``weight`` plus ``weight_clip_val`` per linear.

        ``bits`` is the run's ``w_bits`` (0 means ternary there). Codes are derived with the reference forward.
        """
        grid = grid_for_bits(bits)
        clip_keys = [k for k in state_dict if k.endswith(".weight_clip_val")]
        if not clip_keys:
            raise CheckpointError(
                "no '*.weight_clip_val' tensors found: this is not a ParetoQ reference training checkpoint "
                "(for weights already on the grid use --import on-grid)"
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
        dtype = _FLOAT_DTYPES[float_dtype]
        tensors = {k: _to_float_dtype(k, v, dtype) for k, v in state_dict.items() if k not in skip}
        recipe = {"imported_from": "paretoq-reference", "w_bits": grid.bits, "float_dtype": float_dtype}
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        return cls(config, quantized, tensors, _tokenizer_files(tokenizer), recipe)

    @classmethod
    def from_on_grid_model(
        cls,
        model: nn.Module,
        bits: float | str,
        tokenizer: Any = None,
        target_modules: tuple[str, ...] = DECODER_LINEARS,
        overrides: dict[str, float] | None = None,
        float_dtype: str = "float16",
    ) -> "QuantizedCheckpoint":
        """Import a model whose target linears already hold grid values (e.g. MobileLLM-ParetoQ in bf16).

        Each row's codes and step are recovered; a row with more distinct values than the grid has levels, or
        values off the grid by more than bf16 rounding, is an error naming the module and row.
        """
        from qat.prepare import QATConfig

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
        dtype = _FLOAT_DTYPES[float_dtype]
        tensors = {k: _to_float_dtype(k, v, dtype) for k, v in state.items() if k not in skip}
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        recipe = {"imported_from": "on-grid", "qat_config": qcfg.to_json(), "float_dtype": float_dtype}
        return cls(config, quantized, tensors, _tokenizer_files(tokenizer), recipe)

    # ------------------------------------------------------------------ views
    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def bits_per_module(self) -> dict[str, float]:
        return {k[: -len(".weight")]: q.grid.bits for k, q in self.quantized.items()}

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in float32 (quantized ones as s * (q - z)); tied lm_head not repeated."""
        out = {k: (v.float() if v.is_floating_point() else v) for k, v in self.tensors.items()}
        out.update({k: q.dequantize() for k, q in self.quantized.items()})
        return out

    def build_reference_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A plain transformers model holding exactly the dequantized weights: the reference for every check."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**self.config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        state = self.dequantized_state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        allowed_missing = {"lm_head.weight"} if self.tied else set()
        if set(missing) - allowed_missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match {config.architectures}: missing {sorted(set(missing) - allowed_missing)[:3]}"
                f", unexpected {sorted(unexpected)[:3]}"
            )
        if self.tied:
            model.tie_weights()
        # non-persistent buffers (rotary inv_freq) were left on meta: materialise them from the config
        for module_name, module in model.named_modules():
            for buf_name, buf in list(module.named_buffers(recurse=False)):
                if buf.is_meta:
                    _rebuild_buffer(model, module_name, module, buf_name)
        return model.to(dtype).eval()

    # ------------------------------------------------------------------ disk
    def quantization_config(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "modules": {
                k[: -len(".weight")]: {"grid": q.grid.name, "bits": q.grid.bits, "shape": list(q.shape)}
                for k, q in self.quantized.items()
            },
            "grids": {name: GRIDS[name].to_json() for name in sorted({q.grid.name for q in self.quantized.values()})},
            "layout": "qweight: per-row LSB-first packed codes; w = scales[row] * (code - zero), float32",
            "recipe": self.recipe,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write atomically: a temporary sibling directory, renamed into place when complete."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise CheckpointError(f"output {path} exists and is not empty: pass --overwrite or choose another -o")
        with atomic_dir(path) as tmp:
            tensors: dict[str, torch.Tensor] = dict(self.tensors)
            for key, q in self.quantized.items():
                base = key[: -len(".weight")]
                packed = pack_codes(q.codes.numpy(), q.grid.code_bits)
                tensors[f"{base}.qweight"] = torch.from_numpy(packed)
                tensors[f"{base}.scales"] = q.scale.to(torch.float16).contiguous()
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "quant_method": QUANT_METHOD})
            for name, data in self.tokenizer_files.items():
                (tmp / name).write_bytes(data)
            qconfig = self.quantization_config()
            qconfig["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
            config = dict(self.config, quantization_config=qconfig)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "QuantizedCheckpoint":
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{path} is not a paretoq checkpoint (no {CONFIG_FILE}): make one with `paretoq-export quantize` "
                "or `paretoq-export qat`"
            )
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE} is corrupt ({exc}): re-create the checkpoint") from exc
        qconfig = config.pop("quantization_config", None)
        if not qconfig or qconfig.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"{path} has no paretoq quantization_config: it is a float model, quantize it first")
        if qconfig.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} uses checkpoint format {qconfig['format_version']}: upgrade paretoq-export")
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing: the checkpoint is half-written, re-create it")
        if verify and qconfig.get("weights_sha256") not in (None, _sha256(weights)):
            raise CheckpointError(f"{weights} is corrupt (sha256 differs from config.json): re-create the checkpoint")
        try:
            raw = load_file(weights)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{weights} is corrupt ({exc}): re-create the checkpoint") from exc
        quantized = {}
        for base, info in qconfig["modules"].items():
            grid = GRIDS[info["grid"]]
            rows, cols = info["shape"]
            try:
                packed, scale = raw.pop(f"{base}.qweight"), raw.pop(f"{base}.scales")
            except KeyError as exc:
                raise CheckpointError(f"{weights} lacks {exc.args[0]}: the checkpoint is corrupt, re-create it") from None
            if tuple(packed.shape) != (rows, packed_row_bytes(cols, grid.code_bits)) or tuple(scale.shape) != (rows,):
                raise CheckpointError(f"{base}: packed shape {tuple(packed.shape)} does not match {rows}x{cols}: corrupt")
            codes = unpack_codes(packed.numpy(), grid.code_bits, cols)
            if grid.n_codes < 2**grid.code_bits and codes.max(initial=0) >= grid.n_codes:
                raise CheckpointError(f"{base}: code {codes.max()} is outside the {grid.name} grid: corrupt checkpoint")
            quantized[f"{base}.weight"] = QuantizedTensor(torch.from_numpy(codes), scale.to(torch.float16), grid)
        tokenizer_files = {
            p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name not in (CONFIG_FILE, WEIGHTS_FILE)
        }
        return cls(config, quantized, raw, tokenizer_files, qconfig.get("recipe", {}))

    def load_tokenizer(self):
        """The tokenizer saved with the checkpoint (transformers AutoTokenizer), or None."""
        if not self.tokenizer_files:
            return None
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in self.tokenizer_files.items():
                (Path(tmp) / name).write_bytes(data)
            return AutoTokenizer.from_pretrained(tmp)

    def nbytes(self) -> dict[str, int]:
        """Packed code bytes, step bytes and float-tensor bytes (what the file holds, headers aside)."""
        codes = sum(q.shape[0] * packed_row_bytes(q.shape[1], q.grid.code_bits) for q in self.quantized.values())
        steps = sum(q.shape[0] * 2 for q in self.quantized.values())
        floats = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return {"codes": codes, "steps": steps, "float": floats, "total": codes + steps + floats}


def _rebuild_buffer(model: nn.Module, module_name: str, module: nn.Module, buf_name: str) -> None:
    # Rotary embeddings compute inv_freq from the config in __init__; re-run that on CPU.
    if hasattr(module, "rope_init_fn") or "rotary" in type(module).__name__.lower():
        fresh = type(module)(config=model.config)
        for name, buf in fresh.named_buffers(recurse=False):
            module.register_buffer(name, buf, persistent=False)
        for attr in ("attention_scaling", "original_inv_freq"):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))
        return
    raise CheckpointError(f"cannot rebuild buffer {module_name}.{buf_name} of {type(module).__name__}")


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
