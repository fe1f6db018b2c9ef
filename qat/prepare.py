"""Swap a transformers causal LM's decoder linears for ParetoQ quantized modules: ``prepare(model, config)``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from paretoq_export.canonical.model_description import DECODER_LINEAR_NAMES
from qat.grids import EMBEDDING_BITS, WEIGHT_BITS, format_bits, parse_bits
from qat.modules import GROUP_SIZES, QUANT_MODULES, QuantEmbedding, QuantLinear, check_group_size
from qat.quantizers import ALPHA_INITS
from qat.targets import format_stored_bits, stored_bits

# separate projections (Llama, Qwen, Mistral, Gemma) and the fused ones of Phi-3 (qkv_proj, gate_up_proj), from the
# one model description the exporters read
DECODER_LINEARS = DECODER_LINEAR_NAMES


@dataclass
class QATConfig:
    """What to quantize, as data. ``overrides`` maps a module-name suffix or regex to bits (e.g. down_proj=4).

    ``group_size`` G: one alpha per G consecutive columns of a row (32, 64, 128, 256) instead of one per row (None,
    ParetoQ's setting); ``group_overrides`` maps a module-name suffix or regex to a group size (None: per row),
    as ``overrides`` does for bits. Embeddings / lm_head follow the same rules under their own module names.
    """

    bits: float | str = 2
    target_modules: tuple[str, ...] = DECODER_LINEARS
    overrides: dict[str, float | str] = field(default_factory=dict)
    embedding_bits: float | str | None = None  # 4 or 8: quantize the input embedding table
    lm_head_bits: float | str | None = None  # 4 or 8: quantize the output projection
    alpha_init: str = "paper"  # "paper": max/mean-based as the reference; "mse": per-row least-squares search
    group_size: int | None = None
    group_overrides: dict[str, int | None] = field(default_factory=dict)
    # --target: the format whose containers decide, per module, the grid and group size trained (from the bits
    # asked for); storage_plan is that format's ExportFormat.storage_plan, handed over by the commands (qat does
    # not import formats). None: bits and group sizes exactly as given.
    target: str | None = None
    storage_plan: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.target is None) != (self.storage_plan is None):
            raise ValueError("a target needs its format's storage plan: QATConfig(target=name, "
                             "storage_plan=formats.registry.format_named(name).storage_plan)")
        if self.target is not None and (self.group_size is not None or self.group_overrides):
            raise ValueError(f"--target {self.target} chooses the group sizes: drop --group-size, or drop --target")
        self.group_size = _check_group(self.group_size, "group size")
        self.group_overrides = {k: _check_group(v, f"group size of {k}") for k, v in self.group_overrides.items()}
        if self.alpha_init not in ALPHA_INITS:
            raise ValueError(f"alpha init {self.alpha_init!r} is unknown: choose from {', '.join(ALPHA_INITS)}")
        self.bits = _check(parse_bits(self.bits), WEIGHT_BITS, "bits")
        self.overrides = {k: _check(parse_bits(v), WEIGHT_BITS, f"override {k}") for k, v in self.overrides.items()}
        if self.embedding_bits is not None:
            self.embedding_bits = _check(parse_bits(self.embedding_bits), EMBEDDING_BITS, "embedding bits")
        if self.lm_head_bits is not None:
            self.lm_head_bits = _check(parse_bits(self.lm_head_bits), EMBEDDING_BITS, "lm_head bits")

    def bits_for(self, name: str) -> float:
        return _lookup(self.overrides, name, self.bits)

    def group_size_for(self, name: str) -> int | None:
        return _lookup(self.group_overrides, name, self.group_size)

    def to_json(self) -> dict:
        return {
            "bits": self.bits,
            "target_modules": list(self.target_modules),
            "overrides": dict(self.overrides),
            "embedding_bits": self.embedding_bits,
            "lm_head_bits": self.lm_head_bits,
            "alpha_init": self.alpha_init,
            "group_size": self.group_size,
            "group_overrides": dict(self.group_overrides),
            "target": self.target,
        }


@dataclass(frozen=True)
class _AsGiven:
    bits: float
    group_size: int | None


def _lookup(table: dict, name: str, default):
    for key, value in table.items():
        if name.endswith(key) or name.split(".")[-1] == key or re.fullmatch(key, name):
            return value
    return default


def _check_group(value, what: str) -> int | None:
    if value in (None, "", "row", "none", 0, "0"):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = -1
    if size not in GROUP_SIZES:
        raise ValueError(f"unsupported {what} {value!r}: choose from {', '.join(map(str, GROUP_SIZES))} "
                         "(or none: one step per row)")
    return size


def _check(bits: float, allowed: tuple[float, ...], what: str) -> float:
    if bits not in allowed:
        raise ValueError(f"unsupported {what} {format_bits(bits)}: choose from {', '.join(map(format_bits, allowed))}")
    return bits


def parse_overrides(items: list[str] | None) -> dict[str, float]:
    """CLI form ``NAME=BITS`` (e.g. ``down_proj=4``) to a dict."""
    out: dict[str, float] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like NAME=BITS, e.g. down_proj=4")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_bits(value)
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def prepare(model: nn.Module, config: QATConfig) -> nn.Module:
    """Replace the target linears (and optionally embeddings / lm_head) in place; returns the model.

    Raises ValueError naming the architecture when no target linear is found.
    """
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.split(".")[-1] in config.target_modules
    ]
    if not targets:
        from paretoq_export.canonical.model_description import FAMILIES

        arch = type(model).__name__
        raise ValueError(
            f"no {'/'.join(config.target_modules)} linear layers found in {arch}: this architecture is not "
            f"supported; supported are {', '.join(f.hf_class for f in FAMILIES.values())}"
        )
    tied = is_tied(model)
    emb_bits, head_bits = config.embedding_bits, config.lm_head_bits
    if tied and (emb_bits is not None or head_bits is not None):
        if emb_bits is not None and head_bits is not None and emb_bits != head_bits:
            raise ValueError("this model ties lm_head to the embeddings: give both the same bits")
        emb_bits = head_bits = emb_bits if emb_bits is not None else head_bits
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names.get(id(model.get_input_embeddings()), "embed_tokens")
    head_name = emb_name if tied else names.get(id(model.get_output_embeddings()), "lm_head")
    # every module's grid and group size decided, and every row length checked, before any module is replaced
    wanted = {name: (config.bits_for(name), False) for name in targets}
    if emb_bits is not None:
        wanted[emb_name] = (emb_bits, True)
    if head_bits is not None and not tied:
        wanted[head_name] = (head_bits, True)
    plan: dict[str, Any] = {}  # name -> placement (bits, group_size, container, stored_bits)
    for name, (bits, table) in wanted.items():
        cols = model.get_submodule(name).weight.shape[1]
        if config.storage_plan is not None:
            plan[name] = config.storage_plan(cols, bits, table)
        else:
            plan[name] = _AsGiven(bits, config.group_size_for(name))
        check_group_size(plan[name].group_size, cols, name)
    for name in targets:
        _set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), plan[name].bits,
                                                          config.alpha_init, plan[name].group_size))
    if emb_bits is not None:
        emb = model.get_input_embeddings()
        qemb = QuantEmbedding.from_embedding(emb, plan[emb_name].bits, config.alpha_init, plan[emb_name].group_size)
        model.set_input_embeddings(qemb)
    if head_bits is not None:
        head = model.get_output_embeddings()
        p = plan[emb_name if tied else head_name]
        qhead = QuantLinear.from_linear(head, p.bits, config.alpha_init, p.group_size)
        if tied:
            qhead.alpha = model.get_input_embeddings().alpha  # one table, one set of steps
        model.set_output_embeddings(qhead)
    model._paretoq_config = config  # read by the checkpoint to record the recipe
    if config.target is not None:
        entries = [(n, *model.get_submodule(n).weight.shape, p) for n, p in plan.items()]
        model._paretoq_stored_bits = {"target": config.target, **stored_bits(entries)}
    return model


def stored_bits_summary(model: nn.Module) -> str | None:
    """The CLI's lines on the bits per weight a --target model stores (None without a target)."""
    report = getattr(model, "_paretoq_stored_bits", None)
    return None if report is None else format_stored_bits(report, report["target"])


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> quantized module, in model order (tied lm_head included under its own name)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QUANT_MODULES)}


def quantization_summary(model: nn.Module) -> dict[str, float]:
    return {name: m.grid.bits for name, m in quantized_modules(model).items()}
