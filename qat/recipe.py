"""Named QAT recipes: the settings that decide how a short fine-tune reaches the grid, as data.

ParetoQ's own recipe ("paper") starts training from the quantized model (alpha at the weights' extremes, the
forward fully quantized from step 0) and relies on tens of billions of tokens to recover. At the budgets a user has
on one GPU (about a million tokens), that start is the problem: 2-bit SmolLM2-135M begins at a perplexity of 2.8e7.
The default recipe keeps everything that makes the output ParetoQ (the grids, the learned per-row steps, the
straight-through gradients, the canonical checkpoint) and changes how training gets there:

- ``alpha_init="mse"``: each row's alpha starts at the least-squares fit of its weights (qat.quantizers.search_alpha);
- ``anneal_frac``: the forward blends from the float weights into the quantized ones over the first part of the run
  (soft-to-hard), so training starts at the float model's loss and the weights drift into the grid;
- ``distill_weight``: the float model is the teacher (KL on its next-token distribution), the signal that needs no
  labels and carries the float model's behaviour.

The figures behind the default are in docs/BENCHMARKS.md ("QAT recipe ablation"); ``recipe("paper")`` keeps the
paper's settings one flag away. Explicit settings always win over a recipe's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Recipe:
    name: str
    alpha_init: str = "paper"  # qat.prepare.QATConfig.alpha_init
    anneal_frac: float = 0.0  # qat.trainer.TrainConfig.anneal_frac
    alpha_lr_scale: float = 1.0  # TrainConfig.alpha_lr_scale
    distill_weight: float = 0.0  # TrainConfig.distill_weight (needs the float model as teacher)
    lr_low_bits: float | None = None  # peak lr for <= 2-bit models (None: the paper's, qat.trainer.default_lr)
    lr_high_bits: float | None = None  # peak lr for 3/4-bit models (None: the paper's)
    # peak lr for 3/4-bit models with one step per group of weights (QATConfig.group_size): their least-squares
    # start is already close (4-bit per 32: 1.31x float PPL on SmolLM2) and a per-row lr walks away from it
    lr_grouped: float | None = None

    def lr_for(self, bits: float, grouped: bool = False) -> float | None:
        """The recipe's peak lr for a model whose widest quantized grid is ``bits``, with group-wise steps where
        ``grouped`` (None: the trainer's default)."""
        if bits <= 2:
            return self.lr_low_bits
        return self.lr_grouped if grouped and self.lr_grouped is not None else self.lr_high_bits

    def to_json(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper"),
    # SmolLM2-135M, 1.16M tokens, held-out PPL at 2 bits (float 14.03): paper 301, + mse init 101, + anneal 63.6,
    # + alpha lr x10 50.7, + distillation 1.0 and lr 1e-3: 37.1 (torchao PARQ: 69.6). At 4 bits per 32 (llama.cpp's
    # Q4_0 layout, 8-bit table) the lr decides it: 5e-4 17.57, 2e-4 15.42, 1e-4 15.02, 3e-5 14.84 (float 14.03),
    # while per row 3e-5 is far worse (19.75 vs 16.56 at 5e-4). docs/BENCHMARKS.md has the rest.
    "default": Recipe("default", alpha_init="mse", anneal_frac=0.4, alpha_lr_scale=10.0, distill_weight=1.0,
                      lr_low_bits=1e-3, lr_high_bits=5e-4, lr_grouped=3e-5),
}
DEFAULT_RECIPE = "default"


def recipe(name: str = DEFAULT_RECIPE, **overrides) -> Recipe:
    """The named recipe with any explicitly given settings (None values are ignored) put over it."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is unknown: choose from {', '.join(RECIPES)}")
    known = {f.name for f in fields(Recipe)} - {"name"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown recipe settings {sorted(unknown)}: choose from {sorted(known)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def apply_recipe(chosen: Recipe, qat_config, train_config):
    """(QATConfig, TrainConfig) with the recipe's settings written in; a TrainConfig lr that is already set wins
    over the recipe's. The caller passes the float model as the teacher when ``distill_weight > 0``."""
    qat_config = replace(qat_config, alpha_init=chosen.alpha_init)
    widest = max([qat_config.bits, *qat_config.overrides.values()])
    grouped = qat_config.group_size is not None
    lr = train_config.lr if train_config.lr is not None else chosen.lr_for(widest, grouped)
    train_config = replace(train_config, lr=lr, anneal_frac=chosen.anneal_frac,
                           alpha_lr_scale=chosen.alpha_lr_scale, distill_weight=chosen.distill_weight)
    return qat_config, train_config
