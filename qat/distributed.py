"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the QAT trainer: sharding, sharded checkpoints, gathering.

Sharding. Every decoder layer is its own FSDP unit and the root (embeddings, final norm, lm_head, tied or not)
is one more, so a tied table and its lm_head share one unit. Parameters stay float32 (no MixedPrecisionPolicy
param_dtype): the ParetoQ levels are decided by ``w / alpha`` on the latent weights, and doing that in bf16
would change which level a weight lands on compared with one process or DDP. bf16 comes from autocast, as in
the other modes.

The per-row alphas ([out, 1] parameters of each QuantLinear) are sharded like every FSDP2 parameter, on dim 0,
i.e. with the weight rows: chunking dim 0 of [out, in] and of [out, 1] over the same ranks gives the same row
ranges, so rank r owns the alphas of exactly the weight rows it owns, and their AdamW state. Nothing else is
needed: the fake-quant runs in the forward on the all-gathered (unsharded) weight and alpha, so the per-tensor
grad_scale 1/sqrt(numel * Qp) sees the full weight, and the alpha gradients are reduce-scattered and averaged
like the weight gradients. (Replicating them instead would buy nothing: they are 1/in of a layer's bytes.)

Checkpoints. ``torch.distributed.checkpoint`` writes each rank's shards of the model and the optimizer under
``output_dir/trainer_state_dcp/step_NNNNNNN``; rank 0 then writes ``trainer_state.pt`` atomically with the step,
schedule, RNG and the name of that directory, so a crash mid-save leaves the previous checkpoint in force.
``load_trained_weights`` reads either kind of trainer checkpoint into a plain model in one process (DCP
re-shards on load), the route to a canonical checkpoint from a run whose processes are gone.
"""

from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

STATE_FILE = "trainer_state.pt"  # the trainer's checkpoint in output_dir (qat.trainer uses this name)
DCP_DIR = "trainer_state_dcp"


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class transformers lists as not to be split (LlamaDecoderLayer, ...),
    else the children of the first nn.ModuleList named 'layers'."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList):
            return list(module)
    return []


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A fully_shard()'ed copy of ``model`` on ``device`` (one FSDP unit per decoder layer plus the root).

    A copy, so that ``model`` itself stays a plain module that ``gather_into`` fills with the trained weights at
    the end (QATCheckpoint.from_qat_model and the exporters need full tensors). Costs one extra host copy
    of the float32 model per process while sharding.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    sharded = copy.deepcopy(model)
    for layer in _decoder_layers(sharded):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)  # the root also moves the remaining parameters and buffers to the device
    return sharded


@contextmanager
def skip_gradient_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Gradient accumulation without reduce-scatter on the micro-batches before the last (FSDP's no_sync)."""
    if not skip:
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def scalar(value: torch.Tensor) -> float:
    """.item() of a norm that may be a DTensor (FSDP2's clip_grad_norm_ returns a replicated DTensor)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value.item())


def gather_full_state(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on every rank. A collective: every rank must call it."""
    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))


def gather_into(sharded: nn.Module, model: nn.Module) -> None:
    """Copy the trained weights of the sharded copy into the plain ``model`` (every rank). A collective."""
    full = gather_full_state(sharded)
    _load_full(model, full)


def _load_full(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(full, strict=False)
    # a tied lm_head may be absent from the gathered dict: it is the embedding's tensor, loaded under that name
    tied_ok = {name for name in missing if _same_tensor(model, name, full)}
    if unexpected or set(missing) - tied_ok:
        raise RuntimeError(f"state mismatch: missing {sorted(set(missing) - tied_ok)}, unexpected {unexpected}")


def _same_tensor(model: nn.Module, name: str, full: dict) -> bool:
    target = model.get_parameter(name) if name in dict(model.named_parameters(remove_duplicate=False)) else None
    if target is None:
        return False
    return any(p is target and n in full for n, p in model.named_parameters(remove_duplicate=False))


def save_sharded(path: Path, sharded: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Each rank writes its shards of the model and optimizer states (torch.distributed.checkpoint), and of
    ``extra`` tensors (e.g. keep_best's copy of the best weights, DTensors like the parameters). Collective."""
    model_state, optim_state = get_state_dict(sharded, optimizer)
    state = {"model": model_state, "optim": optim_state}
    if extra:
        state["extra"] = extra
    # overwrite=True said explicitly: a re-save of the same step (a resumed run ending where it stopped) replaces it
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path, overwrite=True))


def load_sharded(path: Path, sharded: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, torch.Tensor] | None = None) -> None:
    """Load a save_sharded() checkpoint into the sharded model and optimizer (any world size), and its extra
    tensors in place into ``extra`` (tensors of the saved shapes: DCP re-shards into them). Collective."""
    model_state, optim_state = get_state_dict(sharded, optimizer)
    state = {"model": model_state, "optim": optim_state}
    if extra:
        state["extra"] = extra
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(sharded, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def remove_older(output_dir: Path, keep: str) -> None:
    """Delete the sharded checkpoints other than ``keep`` (after trainer_state.pt names ``keep``)."""
    root = output_dir / DCP_DIR
    for old in root.glob("step_*"):
        if old.name != Path(keep).name:
            shutil.rmtree(old, ignore_errors=True)


def load_trained_weights(model: nn.Module, output_dir: str | Path) -> int:
    """Load the model weights (alphas included) of the trainer checkpoint in ``output_dir`` into a plain (not
    sharded, not wrapped) prepare()'d model, in one process; returns the checkpoint's step.

    Reads both kinds: trainer_state.pt with the full state (one process, DDP) and trainer_state.pt naming a
    torch.distributed.checkpoint directory (FSDP), which DCP re-assembles from the shards of every rank.
    """
    state_path = Path(output_dir) / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {output_dir}: point at the output_dir of a training run")
    saved = torch.load(state_path, map_location="cpu", weights_only=False)  # our own file (RNG states etc.)
    if "model" in saved:
        model.load_state_dict(saved["model"])
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(Path(output_dir) / saved["dcp"]))
        set_model_state_dict(model, state["model"])
    return int(saved["step"])
