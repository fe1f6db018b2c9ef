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
- ``table_bits_low`` / ``table_bits_high``: the embedding table (and a tied output head) quantized with the rest,
  4-bit below 3 bits and 8-bit at 3/4 bits, where the user names no width (``with_recipe_table``): a float table
  is most of a small model's file.

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
    # the embedding table's width (4 or 8; None: float), for <= 2-bit and for 3/4-bit models, where the user gives
    # neither --embedding-bits nor --lm-head-bits (with_recipe_table). In a tied model it is the output head too.
    table_bits_low: int | None = None
    table_bits_high: int | None = None

    def table_bits_for(self, bits: float) -> int | None:
        """The recipe's table width for a model whose widest quantized grid is ``bits`` (None: float)."""
        return self.table_bits_low if bits <= 2 else self.table_bits_high

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
    # while per row 3e-5 is far worse (19.75 vs 16.56 at 5e-4). The table (same runs, held-out PPL vs a float
    # table): 8-bit per row costs 0.0% at 4 bits, 2.0% at 3, 5.8% at 2, 3.9% at 1.58; 4-bit costs 21% / 25% / 14% /
    # 14%. Below 3 bits a float table is over half of SmolLM2's GGUF (54 of 107 MiB) and no 8-bit table brings the
    # file under llama.cpp's own Q4_0 (82 vs 87.5 MiB), which is then both smaller and better: the 4-bit table is
    # what makes a <= 2-bit file worth having (67 MiB). At 3/4 bits the 8-bit table halves it for <= 2%.
    # docs/BENCHMARKS.md has the rest.
    "default": Recipe("default", alpha_init="mse", anneal_frac=0.4, alpha_lr_scale=10.0, distill_weight=1.0,
                      lr_low_bits=1e-3, lr_high_bits=5e-4, lr_grouped=3e-5, table_bits_low=4, table_bits_high=8),
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


def widest_bits(qat_config) -> float:
    """The widest grid a QATConfig trains (--bits and every --override): what picks the recipe's lr and table."""
    return max([qat_config.bits, *qat_config.overrides.values()])


def with_recipe_table(chosen: Recipe, qat_config):
    """The QATConfig with the recipe's table width where it names none (neither embedding nor lm_head bits). The
    caller decides whether the user gave one: ``--embedding-bits float`` keeps the table float on purpose."""
    if qat_config.embedding_bits is not None or qat_config.lm_head_bits is not None:
        return qat_config
    return replace(qat_config, embedding_bits=chosen.table_bits_for(widest_bits(qat_config)))


def apply_recipe(chosen: Recipe, qat_config, train_config):
    """(QATConfig, TrainConfig) with the recipe's settings written in; a TrainConfig lr that is already set wins
    over the recipe's. The caller passes the float model as the teacher when ``distill_weight > 0``."""
    qat_config = replace(qat_config, alpha_init=chosen.alpha_init)
    widest = widest_bits(qat_config)
    grouped = qat_config.group_size is not None
    lr = train_config.lr if train_config.lr is not None else chosen.lr_for(widest, grouped)
    train_config = replace(train_config, lr=lr, anneal_frac=chosen.anneal_frac,
                           alpha_lr_scale=chosen.alpha_lr_scale, distill_weight=chosen.distill_weight)
    return qat_config, train_config
