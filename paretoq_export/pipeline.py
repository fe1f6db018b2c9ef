"""One entry point per action: RTN quantize, QAT, import, evaluate. The CLI and the quickstart call these."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paretoq_export.canonical.atomic import check_output
from paretoq_export.canonical.checkpoint import CheckpointError
from paretoq_export.canonical.licenses import known_license
from paretoq_export.canonical.model_description import FAMILIES
from paretoq_export.model_source import check_model_code, load_model, load_tokenizer, read_model_config
from qat.checkpoint_io import QATCheckpoint
from qat.data import DataConfig, build_data
from qat.prepare import QATConfig, prepare


def _check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any expensive work when the output would be refused at save time (exists, unwritable)."""
    return check_output(output, overwrite, folder=True)


def refuse_float_linears(model: torch.nn.Module) -> None:
    """After prepare: every linear is quantized (lm_head aside, which has its own flag), or the run stops here,
    before any training; a linear of a layout prepare does not know (a fused qkv_proj) would otherwise stay float
    in every export without a word."""
    left = [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and name.split(".")[-1] != "lm_head"]
    if left:
        raise ValueError(f"{len(left)} linear layer(s) would stay float ({', '.join(left[:3])}"
                         f"{', ...' if len(left) > 3 else ''}): their layout is not one ParetoQ quantizes here; "
                         f"use a supported architecture ({', '.join(f.hf_class for f in FAMILIES.values())})")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def heldout_perplexity(model: torch.nn.Module, blocks: torch.Tensor, max_blocks: int | None = None,
                       batch_size: int = 4) -> float:
    from qat.trainer import evaluate_perplexity

    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return evaluate_perplexity(model, blocks, batch_size=batch_size)


def quantize_rtn(
    model_spec: str | None,
    qat_config: QATConfig,
    output: str | os.PathLike,
    overwrite: bool = False,
    float_dtype: str = "float16",
    trust_remote_code: bool = False,
) -> Path:
    """Round-to-nearest with the ParetoQ alpha initialisation (no training): the RTN baseline."""
    out = _check_output(output, overwrite)
    source = load_model(model_spec, trust_remote_code=trust_remote_code)
    prepare(source.model, qat_config)
    refuse_float_linears(source.model)
    recipe = {"method": "rtn", **source_recipe(source)}
    ckpt = QATCheckpoint.from_qat_model(source.model, source.tokenizer, recipe=recipe, float_dtype=float_dtype)
    return ckpt.save(out, overwrite=overwrite)


@dataclass
class QATRun:
    checkpoint: Path | None
    result: object  # qat.trainer.TrainResult
    seconds: float


def run_qat(
    model_spec: str | None,
    qat_config: QATConfig,
    data: DataConfig,
    train_config,  # qat.trainer.TrainConfig
    output: str | os.PathLike,
    overwrite: bool = False,
    float_dtype: str = "float16",
    trust_remote_code: bool = False,
    distill: bool = False,
    recipe: dict | None = None,
) -> QATRun:
    """ParetoQ QAT from a float model, then the canonical checkpoint (rank 0 writes it under torchrun)."""
    from qat.trainer import train

    out = _check_output(output, overwrite)
    source = load_model(model_spec, trust_remote_code=trust_remote_code)
    # teacher[:N] sources sample the float model: before prepare() turns it into the student
    train_blocks, heldout_blocks = build_data(source.tokenizer, data, model=source.model)
    teacher = None
    if distill or getattr(train_config, "distill_weight", 0) > 0:
        import copy

        teacher = copy.deepcopy(source.model).eval().requires_grad_(False)
    prepare(source.model, qat_config)
    refuse_float_linears(source.model)
    start = time.time()
    result = train(source.model, train_blocks, heldout_blocks, train_config, teacher=teacher)
    seconds = time.time() - start
    checkpoint = None
    if _is_main_process():
        recipe = {
            "method": "qat",
            **({"recipe": recipe} if recipe else {}),
            **source_recipe(source),
            "data": asdict(data),
            "train": {k: v for k, v in asdict(train_config).items() if _jsonable(v)} | {"lr": result.lr},
            "heldout_ppl": result.final_heldout_ppl,  # the returned weights' (keep_best: the best evaluation's)
            "kept_step": result.kept_step,
            "train_tokens": int(result.steps) * train_config.batch_size * train_config.grad_accum
            * data.block_size * int(os.environ.get("WORLD_SIZE", "1")),
            "seconds": round(seconds, 1),
        }
        ckpt = QATCheckpoint.from_qat_model(source.model, source.tokenizer, recipe=recipe, float_dtype=float_dtype)
        checkpoint = ckpt.save(out, overwrite=overwrite)
    return QATRun(checkpoint, result, seconds)


def source_recipe(source) -> dict:
    """What the model card and exporters say about the base model."""
    out = {"base_model": source.base_model, "source": source.description}
    if known_license(source.base_model):
        out["license"] = known_license(source.base_model)
    if source.note:
        out["source_note"] = source.note
    return out


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def import_checkpoint(
    kind: str,
    model_dir: str,
    bits: float | str,
    output: str | os.PathLike,
    overwrite: bool = False,
    float_dtype: str = "float16",
    trust_remote_code: bool = False,
) -> Path:
    """Import a ParetoQ reference training checkpoint or a model whose weights already sit on the grid."""
    out = _check_output(output, overwrite)
    if kind == "on-grid":
        source = load_model(model_dir, trust_remote_code=trust_remote_code)
        ckpt = QATCheckpoint.from_on_grid_model(source.model, bits, source.tokenizer, float_dtype=float_dtype)
    elif kind == "paretoq-reference":
        path = Path(model_dir)
        config = read_model_config(path)
        check_model_code(path, config, trust_remote_code)
        state = read_state_dict(path)
        tokenizer = load_tokenizer(path, trust_remote_code) if (path / "tokenizer_config.json").exists() else None
        ckpt = QATCheckpoint.from_paretoq_reference(state, config, bits, tokenizer, float_dtype=float_dtype)
    else:
        raise ValueError(f"unknown import kind {kind!r}: use paretoq-reference or on-grid")
    return ckpt.save(out, overwrite=overwrite)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: safetensors first; pickles only with weights_only=True."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            state.update(load_file(f))
        return state
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if not pickles:
        raise CheckpointError(f"{path} holds no *.safetensors or *.bin weights")
    for f in pickles:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - an unsafe pickle raises UnpicklingError, which we report plainly
            reason = str(exc).strip().splitlines()[0][:200]
            raise CheckpointError(f"{f} cannot be loaded safely (torch.load weights_only=True refused it: {reason}); "
                                  "convert it to safetensors from a trusted environment") from exc
    return state
