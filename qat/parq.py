"""PARQ baseline: torchao's optimizer-only QAT (``torchao.prototype.parq``) on the same linears and grids as ParetoQ.

PARQ leaves the model untouched: the optimizer keeps float "latent" weights and, after every step, writes their
projection onto a per-row quantization grid into the parameters (``QuantOptimizer`` = base AdamW + a
``Quantizer`` that picks each row's grid + a ``ProxMap`` that moves the weights onto it). With ``ProxPARQ`` the
projection is annealed from identity to hard rounding between ``anneal_start`` and ``anneal_end``; from then on
(and always with ``ProxHardQuant``, i.e. STE) the parameters hold grid values.

Quantizer per bits, per output row (``quant_per_channel``), chosen so PARQ's grid is one of ours and the trained
model converts exactly (codes; the per-row step is rounded to fp16 like every checkpoint's) to
:class:`paretoq_export.checkpoint.QuantizedCheckpoint` via ``from_on_grid_model``:

| bits | PARQ quantizer | levels (x step) | our grid |
|---|---|---|---|
| 1 | ``UnifQuantizer`` (b=1, scale from mean abs) | +-0.5 | binary |
| 1.58 | ``TernaryUnifQuantizer`` (quant_bits 0) | -1, 0, 1 | ternary |
| 2 | ``UnifQuantizer`` (b=2, scale min(2 mean abs, max abs)) | +-0.5, +-1.5 | seq2 |
| 3 | ``UnifTorchaoQuantizer`` (symmetric int3) | -4..3 | lsq3 |
| 4 | ``UnifTorchaoQuantizer`` (symmetric int4) | -8..7 | lsq4 |

The training loop is a small single-device nanoGPT-style loop (``train_parq``) rather than ``qat.trainer.train``:
PARQ needs its own optimizer object, and the trainer builds its AdamW internally. It reuses the trainer's pieces
(``TrainConfig``, ``BlockOrder`` data order, ``cosine_schedule``, ``lm_loss``, ``evaluate_perplexity``) so a PARQ
run sees the same blocks in the same order, with the same lr schedule, clipping and bf16 autocast, as a QAT run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qat.grids import format_bits, grid_for_bits, parse_bits
from qat.prepare import DECODER_LINEARS
from qat.trainer import BlockOrder, TrainConfig, TrainResult, cosine_schedule, evaluate_perplexity, lm_loss

PROX_MAPS = ("parq", "hard")


@dataclass
class PARQConfig:
    """What PARQ quantizes and how it anneals. Fractions are of the run's optimizer steps."""

    bits: float | str = 2
    prox: str = "parq"  # "parq": ProxPARQ annealing (PARQ's recommended map); "hard": ProxHardQuant (STE)
    anneal_start_frac: float = 0.0  # ProxPARQ: identity before this point
    anneal_end_frac: float = 0.9  # ProxPARQ: hard quantization from here on (the last 10% train on the grid)
    steepness: float = 10.0  # ProxPARQ sigmoid steepness of the inverse-slope schedule (torchao's default)
    target_modules: tuple[str, ...] = DECODER_LINEARS

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        if self.bits not in (1.0, 1.58, 2.0, 3.0, 4.0):
            raise ValueError(f"PARQ bits {format_bits(self.bits)} unsupported: choose 1, 1.58, 2, 3 or 4")
        if self.prox not in PROX_MAPS:
            raise ValueError(f"prox={self.prox!r} is not a PARQ proximal map here: choose from {', '.join(PROX_MAPS)}")
        if not 0 <= self.anneal_start_frac < self.anneal_end_frac <= 1:
            raise ValueError(f"need 0 <= anneal_start_frac < anneal_end_frac <= 1, got {self.anneal_start_frac} "
                             f"and {self.anneal_end_frac}")

    def anneal_steps(self, steps: int) -> tuple[int, int]:
        """(anneal_start, anneal_end) in optimizer steps; the end is at most steps - 1 so the last step is hard."""
        end = min(steps - 1, max(1, round(self.anneal_end_frac * steps)))
        start = min(end - 1, round(self.anneal_start_frac * steps))
        return max(0, start), max(1, end)


def _torchao_parq():
    try:
        from torchao.prototype import parq
    except ImportError as exc:  # torchao is an optional dependency of the project
        raise ImportError(f"the PARQ baseline needs torchao >= 0.18 (pip install torchao -c constraints.txt): {exc}"
                          ) from exc
    return parq


def parq_quantizer(bits: float | str):
    """(torchao PARQ Quantizer, the param group's quant_bits) whose per-row grid is our grid for ``bits``."""
    parq = _torchao_parq()
    bits = parse_bits(bits)
    if bits == 1.58:
        return parq.TernaryUnifQuantizer(), 0  # PARQ spells ternary as quant_bits 0
    if bits in (1.0, 2.0):
        # 2^b half-integer levels, scale min(b * mean|w|, max|w|): binary +-mean|w| (XNOR-Net), 2-bit SEQ-like
        return parq.UnifQuantizer(), int(bits)
    if bits in (3.0, 4.0):
        # torchao's own symmetric affine numerics: integer levels -2^(b-1)..2^(b-1)-1 = the LSQ grids
        return parq.UnifTorchaoQuantizer(), int(bits)
    raise ValueError(f"PARQ bits {format_bits(bits)} unsupported: choose 1, 1.58, 2, 3 or 4")


def quantized_parameters(model: nn.Module, target_modules: tuple[str, ...] = DECODER_LINEARS) -> list[nn.Parameter]:
    """The weights of the target linears (q/k/v/o/gate/up/down by default): what PARQ quantizes."""
    params = [m.weight for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.split(".")[-1] in target_modules]
    if not params:
        raise ValueError(f"{type(model).__name__} has no {'/'.join(target_modules)} linears to quantize with PARQ")
    return params


def build_quant_optimizer(model: nn.Module, config: PARQConfig, steps: int, lr: float, weight_decay: float = 0.0):
    """torchao QuantOptimizer over AdamW: the target linears' weights in a quantized group (per-row grids), every
    other parameter (embeddings, norms, biases) in a float group, one lr and weight decay for both (as our QAT)."""
    parq = _torchao_parq()
    quant = quantized_parameters(model, config.target_modules)
    quant_ids = {id(p) for p in quant}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    quantizer, quant_bits = parq_quantizer(config.bits)
    base = torch.optim.AdamW([{"params": quant, "quant_bits": quant_bits}, {"params": rest}],
                             lr=lr, weight_decay=weight_decay)
    if config.prox == "parq":
        start, end = config.anneal_steps(steps)
        prox = parq.ProxPARQ(anneal_start=start, anneal_end=end, steepness=config.steepness)
    else:
        prox = parq.ProxHardQuant()
    # quant_period 1: re-fit each row's grid to its latent weights every step (PARQ's api.create_optimizer default)
    return parq.QuantOptimizer(base, quantizer, prox, quant_period=1, quant_per_channel=True)


def on_grid_fraction(model: nn.Module, bits: float | str, target_modules: tuple[str, ...] = DECODER_LINEARS) -> float:
    """Share of the target linears' rows holding at most as many distinct values as the grid has levels."""
    grid = grid_for_bits(bits)
    rows = good = 0
    for p in quantized_parameters(model, target_modules):
        w = p.detach().float().sort(dim=-1).values
        distinct = 1 + (w[:, 1:] != w[:, :-1]).sum(dim=-1)
        rows += len(distinct)
        good += int((distinct <= grid.n_codes).sum())
    return good / rows


def train_parq(model: nn.Module, train_blocks: torch.Tensor, heldout_blocks: torch.Tensor | None,
               parq_config: PARQConfig, config: TrainConfig) -> TrainResult:
    """Fine-tune a plain causal LM with PARQ on [N, T] blocks, in place; the target linears end on the grid.

    Same data order (``BlockOrder`` from the seed), cosine schedule with warm-up, gradient clipping and bf16 autocast
    as ``qat.trainer.train`` on one device. ``config.lr`` must be given (PARQ has no paper default here).
    """
    if config.lr is None:
        raise ValueError("train_parq needs an explicit learning rate (TrainConfig.lr)")
    if train_blocks.ndim != 2 or len(train_blocks) == 0:
        raise ValueError(f"train_blocks must be a non-empty [N, block_size] tensor, got {tuple(train_blocks.shape)}")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = (device.type == "cuda") if config.bf16 is None else (config.bf16 and device.type == "cuda")
    torch.manual_seed(config.seed)
    was_training = model.training
    model.to(device)
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        model.float()  # float32 latent weights; bf16 only through autocast (as qat.trainer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_quant_optimizer(model, parq_config, config.steps, config.lr, config.weight_decay)
    # the schedule drives the base optimizer's groups, which QuantOptimizer shares
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.base_optimizer, cosine_schedule(config.steps, config.warmup_steps, config.min_lr_ratio))
    order = BlockOrder(len(train_blocks), config.seed)
    tokens_per_step = config.batch_size * config.grad_accum * train_blocks.shape[1]
    has_heldout = heldout_blocks is not None and len(heldout_blocks) > 0
    heldout_ppl: list[tuple[int, float]] = []
    loss_history: list[tuple[int, float]] = []
    window: list[float] = []
    train_time = 0.0

    model.train()
    bar = tqdm(total=config.steps, desc=f"parq {format_bits(parq_config.bits)}-bit", unit="step",
               dynamic_ncols=True, disable=not config.progress)
    for step in range(1, config.steps + 1):
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(config.grad_accum):
            first = ((step - 1) * config.grad_accum + micro) * config.batch_size
            ids = train_blocks[[order[i] for i in range(first, first + config.batch_size)]].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        if not math.isfinite(step_loss):
            raise RuntimeError(f"the PARQ training loss became {step_loss} at step {step}: lower the learning rate")
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()  # AdamW on the latent weights, then the prox map writes the (partly) quantized weights
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        window.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{current_lr:.2e}",
                        tok_s=f"{step * tokens_per_step / max(train_time, 1e-9):,.0f}")
        if step % config.log_every == 0 or step == config.steps:
            loss_history.append((step, sum(window) / len(window)))
            window = []
        if has_heldout and ((config.eval_every > 0 and step % config.eval_every == 0) or step == config.steps):
            heldout_ppl.append((step, evaluate_perplexity(model, heldout_blocks, config.batch_size,
                                                          config.eval_batches, bf16=use_bf16)))
    bar.close()
    model.train(was_training)
    return TrainResult(steps=config.steps, final_loss=loss_history[-1][1] if loss_history else float("nan"),
                       heldout_ppl=heldout_ppl, tokens_per_s=config.steps * tokens_per_step / max(train_time, 1e-9),
                       lr=config.lr, loss_history=loss_history)


def parq_checkpoint(model: nn.Module, bits: float | str, tokenizer=None, recipe: dict | None = None,
                    float_dtype: str = "float16"):
    """The canonical checkpoint of a PARQ-trained model: each target row's codes and step recovered from its grid
    values (``recover_grid_codes``; the step is rounded to fp16, as in every checkpoint). The codes are recovered
    where the model lives (a GPU does it in a blink) and the checkpoint's tensors are moved to the CPU."""
    from qat.checkpoint_io import QATCheckpoint as QuantizedCheckpoint

    ckpt = QuantizedCheckpoint.from_on_grid_model(model, bits, tokenizer, float_dtype=float_dtype)
    for q in ckpt.quantized.values():
        q.codes, q.scale = q.codes.cpu(), q.scale.cpu()
    ckpt.tensors = {k: v.cpu() for k, v in ckpt.tensors.items()}
    ckpt.recipe.update({"method": "parq", **(recipe or {})})
    return ckpt
