"""ParetoQ quantization-aware training loop, nanoGPT style: one function, read top to bottom.

Recipe (ParetoQ paper): AdamW over the latent weights and the per-row ``alpha`` steps in one group, weight decay 0,
cosine decay to 0 after an optional linear warm-up, lr 2e-5 for <= 2-bit and 1e-5 for 3/4-bit.

Runs on one device, or on several under ``torchrun`` (``WORLD_SIZE`` > 1) with ``parallel="ddp"``
(DistributedDataParallel) or ``parallel="fsdp"`` (FSDP2 fully_shard, see qat/distributed.py), each rank taking its
own slice of every global batch, only rank 0 writing files and showing progress. The global batch is
``batch_size * grad_accum * world_size`` blocks and the data order depends only on the seed, so 1 process x 2
blocks, 1 x 1 with grad_accum 2 and 2 processes x 1 block all see the same blocks at every step.

Checkpoints (``output_dir/trainer_state.pt``) hold the model (alphas included), optimizer, scheduler, step and RNG
states; ``resume=True`` continues from one exactly (bit for bit on CPU). Under FSDP the model and optimizer go to
a sharded torch.distributed.checkpoint directory that trainer_state.pt names.

The fake-quant runs fused (qat/fused.py: Triton kernels on CUDA, torch.compile elsewhere) when ``fused`` is on: by
default on CUDA, not on CPU.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from qat import distributed as fsdp
from qat.distill import DEFAULT_CHUNK_TOKENS, chunked_distill_loss, chunked_lm_loss, teacher_topk
from qat.fused import fused_default, restore_fused, set_fused
from qat.grids import WEIGHT_BITS
from qat.modules import QuantLinear, set_blend

STATE_FILE = fsdp.STATE_FILE  # "trainer_state.pt": named in qat.distributed, which reads it back too
PARALLEL_MODES = ("ddp", "fsdp")  # fsdp: FSDP2 (torch.distributed.fsdp.fully_shard)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # blocks per micro-batch per device
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: default_lr() of the model's widest quantized layer
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio (0: to zero, as the paper)
    weight_decay: float = 0.0  # the paper's AdamW uses none (it would pull alphas and weights to 0)
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    eval_every: int | None = None  # held-out perplexity every this many steps (<= 0: only at the end); None:
    #                                steps // 8, about 8 evaluations in a run (the points keep_best picks from)
    eval_batches: int | None = 50  # at most this many held-out batches per evaluation (None: all)
    eval_at_start: bool = True  # also measure the starting point (step 0) of a fresh run
    log_every: int = 10  # loss history granularity; the final loss is the mean of the last window
    seed: int = 0
    bf16: bool | None = None  # bf16 autocast; None: on when training on CUDA. Never used on CPU.
    gradient_checkpointing: bool = False
    distill_weight: float = 0.0  # w in (1 - w) * CE + w * KL(teacher || student); 0: no distillation
    distill_temperature: float = 1.0
    # Recipe levers beyond the paper (qat/recipe.py names the combinations). anneal_frac: over this fraction of the
    # steps the forward blends from the latent float weight into the quantized one (w + b * (Q(w) - w), b rising
    # from 0 to 1 along a cosine ramp), then trains fully quantized; 0 is the paper (quantized from step 0).
    anneal_frac: float = 0.0
    alpha_lr_scale: float = 1.0  # the per-row alphas' lr relative to the weights' (1: one AdamW group, the paper)
    save_every: int = 0  # checkpoint every this many steps (0: only at the end); needs output_dir
    output_dir: str | None = None  # where trainer_state.pt is written (rank 0 only)
    resume: bool = False  # continue from output_dir/trainer_state.pt when it exists
    stop_after: int | None = None  # stop (and checkpoint) at this step: split a run over jobs with a time limit
    parallel: str = "ddp"  # multi-process strategy under torchrun: "ddp" or "fsdp" (FSDP2)
    fused: bool | None = None  # one-pass fake-quant kernels (qat/fused.py); None: on for CUDA, off on CPU
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    progress: bool = True  # tqdm bar (rank 0 only)
    # --- scale, budgets, reproducibility
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # CE and distillation KL in float32 this many tokens at a time
    distill_topk: int = 0  # > 0: distil only the teacher's top-k tokens per position (0: its whole distribution)
    # keep_best: at the end, return the weights and alphas of the best held-out evaluation rather than the last
    # (TrainResult.kept_step says which; the starting point, step 0, counts too). None: on when there is held-out
    # data. Only a run that reaches `steps` restores; the best so far and its weights go into every checkpoint,
    # so a resumed run returns what a straight one would.
    keep_best: bool | None = None
    warn_epochs: float = 2.0  # warn (log + TrainResult.warnings) when the run passes over its data more often
    # deterministic: torch.use_deterministic_algorithms(True), cuDNN deterministic without autotuning, and
    # CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS reads it when CUDA starts: export it before launching; the trainer
    # sets it when unset and warns when CUDA was already running). Two identical runs then write identical
    # checkpoints. The fused fake-quant needs nothing more: its per-row alpha reductions have a fixed order.
    # Cost on one H200 (SmolLM2 2-bit, default recipe): ~1.6x the training time (docs/BENCHMARKS.md).
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.anneal_frac < 1:
            raise ValueError(f"anneal_frac must be in [0, 1) (the last steps train fully quantized), got "
                             f"{self.anneal_frac}")
        if self.alpha_lr_scale <= 0:
            raise ValueError(f"alpha_lr_scale must be > 0, got {self.alpha_lr_scale}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r} is not implemented: choose from {', '.join(PARALLEL_MODES)} "
                             "(fsdp is FSDP2)")
        if (self.save_every or self.resume or self.stop_after) and not self.output_dir:
            raise ValueError("save_every / resume / stop_after need output_dir (where trainer_state.pt lives)")
        if self.loss_chunk_tokens < 1 or self.distill_topk < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 1 and distill_topk >= 0, got {self.loss_chunk_tokens} "
                             f"and {self.distill_topk}")
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 8)


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    final_loss: float  # mean training loss over the last log window
    heldout_ppl: list[tuple[int, float]] = field(default_factory=list)  # (step, perplexity)
    tokens_per_s: float = 0.0  # training tokens per second over all ranks, this run, evaluation excluded
    lr: float = 0.0  # the peak learning rate used
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of the window)
    epochs: float = 0.0  # passes over the training blocks that the whole run (all `steps`) makes
    kept_step: int | None = None  # keep_best: the evaluation whose weights were returned
    warnings: list[str] = field(default_factory=list)

    @property
    def final_heldout_ppl(self) -> float | None:
        """The held-out perplexity of the returned weights: the kept evaluation's under keep_best, else the last."""
        if self.kept_step is not None:
            return dict(self.heldout_ppl)[self.kept_step]
        return self.heldout_ppl[-1][1] if self.heldout_ppl else None


def default_lr(bits: float) -> float:
    """The ParetoQ paper's learning rate: 2e-5 for <= 2-bit weights, 1e-5 for 3 and 4 bits (and float)."""
    return 2e-5 if bits <= 2 else 1e-5


def max_quantized_bits(model: nn.Module) -> float | None:
    """The widest ParetoQ weight grid in the model (4/8-bit embedding size options excluded); None if none."""
    config = getattr(model, "_paretoq_config", None)
    if config is not None:
        return max([config.bits, *config.overrides.values()])
    bits = [m.grid.bits for m in model.modules() if isinstance(m, QuantLinear) and m.grid.bits in WEIGHT_BITS]
    return max(bits) if bits else None


def anneal_blend(step: int, steps: int, anneal_frac: float) -> float:
    """The soft-to-hard blend for optimizer step ``step`` (0-based): a half-cosine from 0 to 1 over the first
    ``anneal_frac * steps`` steps, then 1 (fully quantized). Always 1 when anneal_frac is 0."""
    ramp = anneal_frac * steps
    if ramp <= 0 or step >= ramp:
        return 1.0
    return 0.5 * (1 - math.cos(math.pi * step / ramp))


def cosine_schedule(steps: int, warmup_steps: int, min_lr_ratio: float):
    """lr multiplier per step: linear warm-up to 1, then cosine down to min_lr_ratio at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ------------------------------------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(config: TrainConfig) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), or under torchrun with one
    process when parallel="fsdp" (a 1-GPU FSDP run exercises the sharded path and its checkpoints)."""
    if dist.is_available() and dist.is_initialized():  # the caller set it up: use it, leave it
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    under_torchrun = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (config.parallel == "fsdp" and under_torchrun):
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        # device_id binds the group to this GPU (and keeps barrier() from guessing the device)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _wrap_model(module: nn.Module, config: TrainConfig, ctx: _Dist, device: torch.device) -> nn.Module:
    """The module the training step calls. One process: the model itself. Several: DDP (FSDP2 would go here)."""
    if ctx.world == 1:
        return module
    if config.parallel == "ddp":
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if config.parallel == "fsdp":
        return module  # sharded before the optimizer was built (fsdp.shard_model): already the runner
    raise NotImplementedError(config.parallel)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------- data

class BlockOrder:
    """Global sample index -> block index: a fresh permutation of the blocks each epoch, from the seed alone."""

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, index: int) -> int:
        epoch, pos = divmod(index, self.n)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return int(self._perm[pos])


def _micro_batch(blocks: torch.Tensor, order: BlockOrder, step: int, micro: int, config: TrainConfig,
                 ctx: _Dist) -> torch.Tensor:
    """This rank's slice of micro-batch `micro` of optimizer step `step` (0-based)."""
    first = ((step * config.grad_accum + micro) * ctx.world + ctx.rank) * config.batch_size
    return blocks[[order[i] for i in range(first, first + config.batch_size)]]


# ------------------------------------------------------------------------------------------------- loss

def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """KL(teacher || student) per predicted token at a temperature, scaled by T^2 (Hinton) to keep its gradient
    size independent of T; computed chunk by chunk, never in float32 for the whole batch (qat/distill.py)."""
    return chunked_distill_loss(student_logits, teacher_logits, temperature, chunk_tokens)


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int, max_batches: int | None = None,
                        *, bf16: bool = False) -> float:
    """exp(token-weighted mean next-token cross-entropy) over the first max_batches * batch_size blocks.

    Under torch.distributed the blocks are shared out over the ranks and the sums reduced, so every rank must call
    it. The model's train/eval mode is restored afterwards.
    """
    module = _unwrap(model)
    device = next(module.parameters()).device
    n = len(blocks) if max_batches is None else min(len(blocks), max_batches * batch_size)
    if n == 0:
        raise ValueError("no held-out blocks to evaluate")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    was_training = module.training
    module.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (nll, tokens)
    # FSDP ranks must run the same number of forwards (each all-gathers weights): the ranks that run out of
    # blocks first run a discarded forward on the first block
    lockstep = fsdp.is_fsdp(module) and world > 1
    for first in range(0, n, world * batch_size):
        start = first + rank * batch_size
        if start >= n and not lockstep:
            break
        ids = blocks[start:min(start + batch_size, n)] if start < n else blocks[:1]
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits = module(input_ids=ids, use_cache=False).logits
        if start < n:
            sums[0] += lm_loss(logits, ids, reduction="sum").double()
            sums[1] += ids[:, 1:].numel()
    if world > 1:
        dist.all_reduce(sums)
    module.train(was_training)
    return math.exp(sums[0].item() / sums[1].item())


# ------------------------------------------------------------------------------------------- checkpoint

def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_state(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same directory, then os.replace: a crash never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Fields that decide which blocks each step sees: changing them on resume would silently re-train or skip data.
_DATA_FIELDS = ("batch_size", "grad_accum", "seed")


def _check_resumable(saved: dict, config: TrainConfig, world: int, sharded: bool) -> None:
    if sharded != ("dcp" in saved):
        kinds = {True: "parallel='fsdp' under torchrun", False: "one process or parallel='ddp'"}
        raise ValueError(f"the checkpoint was written by a run with {kinds['dcp' in saved]}, this run uses "
                         f"{kinds[sharded]}: resume with the same setting or use a new output_dir")
    old = saved["config"]
    changed = [f"{k}: {old[k]} -> {getattr(config, k)}" for k in _DATA_FIELDS if old[k] != getattr(config, k)]
    if saved["world_size"] * old["batch_size"] != world * config.batch_size:
        changed.append(f"blocks per micro-step over all ranks: {saved['world_size'] * old['batch_size']} -> "
                       f"{world * config.batch_size}")
    if changed:
        raise ValueError(f"cannot resume with a different data order ({'; '.join(changed)}): use the saved "
                         "settings or a new output_dir")


def _set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn); the GPU
    machines' older transformers has only the old ones. Non-reentrant: the reentrant variant breaks under DDP."""
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


# ------------------------------------------------------------------------------------------------ train

def train(model: nn.Module, train_blocks: torch.Tensor, heldout_blocks: torch.Tensor | None = None,
          config: TrainConfig | None = None, teacher: nn.Module | None = None) -> TrainResult:
    """Fine-tune `model` (a prepare()'d causal LM, or any HF causal LM) on [N, T] token blocks, in place.

    The model (and teacher) are moved to the training device; the model's train/eval mode is restored at the end.
    Under torchrun every rank calls this with the same arguments.
    """
    config = config or TrainConfig()
    with _deterministic(config.deterministic):  # before CUDA starts: cuBLAS reads its workspace setting then
        ctx = _init_distributed(config)
        try:
            return _train(model, train_blocks, heldout_blocks, config, teacher, ctx)
        finally:
            if ctx.owns_group:
                dist.destroy_process_group()


CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"  # a cuBLAS workspace setting under which its kernels are deterministic


def request_deterministic_cublas() -> None:
    """Ask cuBLAS for deterministic kernels (unless the environment already chose a workspace). cuBLAS reads the
    setting when CUDA starts: call this before any model or tensor reaches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)


@contextmanager
def _deterministic(on: bool):
    """torch's deterministic mode for the run (TrainConfig.deterministic), the previous settings restored after."""
    if not on:
        yield
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tqdm.write("warning: deterministic training, but CUDA started before CUBLAS_WORKSPACE_CONFIG was set: "
                       f"export CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC_WORKSPACE} before launching for "
                       "deterministic cuBLAS")
        request_deterministic_cublas()
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """A copy of the trained tensors for keep_best: on the CPU, or in place for FSDP shards (1/world each)."""
    return [p.detach().clone() if isinstance(p, DTensor) else p.detach().to("cpu", copy=True) for p in params]


def _numbered(tensors: list[torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """{"best.0": t0, ...}: a list of tensors as a torch.distributed.checkpoint state dict entry."""
    return None if tensors is None else {f"best.{i}": t for i, t in enumerate(tensors)}


def _train(model: nn.Module, train_blocks: torch.Tensor, heldout_blocks: torch.Tensor | None, config: TrainConfig,
           teacher: nn.Module | None, ctx: _Dist) -> TrainResult:
    # --- set-up: device, precision, seeds
    if config.device is not None:
        device = torch.device(config.device)
    else:
        device = torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
    use_bf16 = (device.type == "cuda") if config.bf16 is None else (config.bf16 and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    torch.manual_seed(config.seed + ctx.rank)  # dropout etc. differ per rank; the data order does not
    random.seed(config.seed + ctx.rank)
    np.random.seed(config.seed + ctx.rank)
    say = tqdm.write if ctx.main and config.progress else (lambda *_: None)

    if train_blocks.ndim != 2 or len(train_blocks) == 0:
        raise ValueError(f"train_blocks must be a non-empty [N, block_size] tensor, got {tuple(train_blocks.shape)}")
    has_heldout = heldout_blocks is not None and len(heldout_blocks) > 0
    if config.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs a teacher model")
    if teacher is not None and config.distill_weight == 0:
        say("note: a teacher was given but distill_weight is 0: not using it")
        teacher = None

    # --- model, teacher, optimizer, schedule
    was_training = model.training
    # FSDP: train a sharded copy (fsdp.shard_model) and gather the result back into `model` at the end
    sharded = config.parallel == "fsdp" and dist.is_available() and dist.is_initialized()
    if config.parallel == "fsdp" and not sharded:
        say("note: parallel='fsdp' outside torchrun: training in this one process, unsharded")
    if not sharded:
        model.to(device)  # .to() moves shared Parameters once: tied embeddings stay tied
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        say("note: casting the model to float32 master weights (bf16 is used through autocast on CUDA)")
        model.float()
    if config.gradient_checkpointing:
        _set_activation_checkpointing(model, True)
    fused = fused_default(device) if config.fused is None else config.fused
    fused_before = set_fused(model, fused)
    trained = fsdp.shard_model(model, device) if sharded else model  # the module whose parameters AdamW steps
    params = [p for p in trained.parameters() if p.requires_grad]  # weights and alphas; ties deduplicated
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        if use_bf16:
            teacher.to(torch.bfloat16)  # forwards only: bf16 weights halve its memory (autocast casts per op anyway)

    bits = max_quantized_bits(model)
    lr = config.lr if config.lr is not None else default_lr(bits if bits is not None else 16)
    alphas = {id(p) for name, p in trained.named_parameters() if name.endswith("alpha")}
    if config.alpha_lr_scale == 1.0:
        groups = [{"params": params}]  # one group, as the paper
    else:  # LambdaLR scales each group's own initial lr, so the ratio holds along the schedule
        groups = [{"params": [p for p in params if id(p) not in alphas]},
                  {"params": [p for p in params if id(p) in alphas], "lr": lr * config.alpha_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(config.steps, config.warmup_steps, config.min_lr_ratio))

    # keep_best: the best held-out evaluation so far and a copy of its weights (checkpointed with the run)
    keep_best = has_heldout and config.keep_best is not False
    best: dict = {"step": None, "ppl": math.inf, "weights": None}

    # --- resume
    state_path = Path(config.output_dir) / STATE_FILE if config.output_dir else None
    step, heldout_ppl, loss_history = 0, [], []
    if config.resume and state_path.is_file():
        # our own file, holding RNG states and numpy arrays besides tensors: not a weights-only load
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        _check_resumable(saved, config, ctx.world, sharded)
        saved_best = saved.get("best") or {}
        if sharded:
            # DCP loads the saved best weights in place into copies shaped (and sharded) like the parameters
            best_weights = _snapshot(params) if saved_best.get("weights") else None
            fsdp.load_sharded(state_path.parent / saved["dcp"], trained, optimizer,
                              extra=_numbered(best_weights))
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            best_weights = saved_best.get("weights")
        if saved_best.get("step") is not None:
            best.update(step=saved_best["step"], ppl=saved_best["ppl"], weights=best_weights)
        scheduler.load_state_dict(saved["scheduler"])
        step, heldout_ppl, loss_history = saved["step"], saved["heldout_ppl"], saved["loss_history"]
        _set_rng_state(saved["rng"])
        say(f"resumed from {state_path} at step {step}")
    elif config.resume:
        say(f"no {state_path} yet: starting from step 0")

    def checkpoint() -> None:
        if sharded:
            # every rank writes its shards first; trainer_state.pt, written last and atomically, makes them current
            weights = {"dcp": f"{fsdp.DCP_DIR}/step_{step:07d}"}
            fsdp.save_sharded(state_path.parent / weights["dcp"], trained, optimizer,
                              extra=_numbered(best["weights"]))
            dist.barrier()
            best_state = {"step": best["step"], "ppl": best["ppl"], "weights": best["weights"] is not None}
        else:
            weights = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            best_state = dict(best)
        if ctx.main:
            save_state(state_path, {
                **weights, "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_state(),
                "best": best_state,
                "config": asdict(config), "world_size": ctx.world,
                "heldout_ppl": heldout_ppl, "loss_history": loss_history,
            })
            if sharded:
                fsdp.remove_older(state_path.parent, keep=weights["dcp"])
        if ctx.world > 1:
            dist.barrier()  # nobody reads or overwrites the file while rank 0 writes it

    def evaluate() -> None:
        set_blend(trained, 1.0)  # always measure the quantized model, also mid-anneal
        ppl = evaluate_perplexity(trained, heldout_blocks, config.batch_size, config.eval_batches, bf16=use_bf16)
        set_blend(trained, anneal_blend(step, config.steps, config.anneal_frac))
        heldout_ppl.append((step, ppl))
        say(f"step {step}: held-out perplexity {ppl:.3f}")
        if keep_best and ppl < best["ppl"]:
            best.update(step=step, ppl=ppl, weights=_snapshot(params))

    runner = _wrap_model(trained, config, ctx, device)
    order = BlockOrder(len(train_blocks), config.seed)
    block_size = train_blocks.shape[1]
    tokens_per_step = config.batch_size * config.grad_accum * ctx.world * block_size
    last_step = min(config.steps, config.stop_after or config.steps)
    train_tokens = len(train_blocks) * block_size
    epochs = config.steps * tokens_per_step / train_tokens
    run_warnings = []
    if epochs > config.warn_epochs:
        run_warnings.append(f"{config.steps} steps of {tokens_per_step} tokens pass over the {train_tokens} training "
                            f"tokens {epochs:.1f} times: expect memorisation (held-out perplexity rising); give "
                            "more data (e.g. teacher:N sampled tokens) or fewer steps")
        say(f"warning: {run_warnings[-1]}")
    say(f"training {last_step - step} steps: lr {lr:g}, {tokens_per_step} tokens/step over {ctx.world} "
        f"process(es), bf16 {use_bf16}, {len(train_blocks)} train blocks")

    if has_heldout and config.eval_at_start and step == 0:
        evaluate()

    # --- the loop: one iteration per optimizer step
    trained.train()
    bar = tqdm(total=config.steps, initial=step, desc="qat", unit="step", dynamic_ncols=True,
               disable=not (ctx.main and config.progress))
    window: list[float] = []
    train_time, tokens_done = 0.0, 0
    while step < last_step:
        t0 = time.perf_counter()
        step_loss = 0.0
        set_blend(trained, anneal_blend(step, config.steps, config.anneal_frac))
        for micro in range(config.grad_accum):
            ids = _micro_batch(train_blocks, order, step, micro, config, ctx).to(device)
            # DDP all-reduces (FSDP reduce-scatters) gradients on every backward; only the last micro-batch's needs to
            sync = micro == config.grad_accum - 1 or ctx.world == 1
            if sharded:
                no_sync = fsdp.skip_gradient_sync(runner, skip=not sync)
            else:
                no_sync = nullcontext() if sync else runner.no_sync()
            with no_sync, autocast():
                target = None
                if teacher is not None and config.distill_topk:
                    with torch.no_grad():  # before the student's forward, so the teacher's full logits are freed
                        target = teacher_topk(teacher(input_ids=ids, use_cache=False).logits, config.distill_topk,
                                              config.loss_chunk_tokens)
                logits = runner(input_ids=ids, use_cache=False).logits
                loss = chunked_lm_loss(logits, ids, config.loss_chunk_tokens)  # lm_loss without float32 copies
                if teacher is not None:
                    if target is None:
                        with torch.no_grad():
                            target = teacher(input_ids=ids, use_cache=False).logits
                    loss = (1 - config.distill_weight) * loss + config.distill_weight * chunked_distill_loss(
                        logits, target, config.distill_temperature, config.loss_chunk_tokens)
                (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        if config.max_grad_norm:
            grad_norm = fsdp.scalar(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        elif sharded:  # the norm of DTensor shards needs the collective that get_total_norm does
            grad_norm = fsdp.scalar(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        else:
            grad_norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_time += time.perf_counter() - t0
        tokens_done += tokens_per_step

        step_loss = _mean_over_ranks(step_loss, device)
        if not math.isfinite(step_loss):
            raise RuntimeError(f"the training loss became {step_loss} at step {step}: lower the learning rate")
        window.append(step_loss)
        tokens_per_s = tokens_done / max(train_time, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{current_lr:.2e}", gnorm=f"{grad_norm:.2f}",
                        tok_s=f"{tokens_per_s:,.0f}")
        if step % config.log_every == 0 or step == last_step:
            loss_history.append((step, sum(window) / len(window)))
            window = []

        if has_heldout and ((config.eval_every > 0 and step % config.eval_every == 0) or step == config.steps):
            evaluate()
        if state_path is not None and ((config.save_every and step % config.save_every == 0) or step == last_step):
            checkpoint()
    bar.close()
    kept_step = None
    if keep_best and best["step"] is not None and step == config.steps:
        kept_step = best["step"]
        if heldout_ppl[-1][0] != kept_step:
            with torch.no_grad():
                for p, saved in zip(params, best["weights"]):
                    p.copy_(saved)
            say(f"keep_best: returning step {kept_step}'s weights (held-out perplexity {best['ppl']:.3f}; the last "
                f"evaluation, step {heldout_ppl[-1][0]}, measured {heldout_ppl[-1][1]:.3f})")
    best["weights"] = None

    if sharded:
        optimizer.state.clear()  # free the AdamW moments before the full weights are gathered
        model.to(device)
        fsdp.gather_into(trained, model)  # every rank's `model` ends with the full trained weights, as under DDP
    if config.gradient_checkpointing:
        _set_activation_checkpointing(model, False)
    set_blend(model, 1.0)
    restore_fused(fused_before)
    model.train(was_training)
    final_loss = loss_history[-1][1] if loss_history else float("nan")
    return TrainResult(steps=step, final_loss=final_loss, heldout_ppl=list(heldout_ppl),
                       tokens_per_s=tokens_done / train_time if train_time else 0.0, lr=lr,
                       loss_history=list(loss_history), epochs=epochs, kept_step=kept_step, warnings=run_warnings)
