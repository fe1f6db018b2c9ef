"""The QAT recipe levers: soft-to-hard annealing, least-squares alpha init, the alpha learning rate, named recipes."""

import copy

import pytest
import torch
from tiny_models import TINY_TEXT, tiny_model, tiny_tokenizer

from qat.data import pack_blocks
from qat.grids import WEIGHT_BITS, grid_for_bits
from qat.modules import QuantLinear, set_blend
from qat.prepare import QATConfig, prepare, quantized_modules
from qat.quantizers import fake_quantize, init_alpha
from qat.recipe import RECIPES, recipe
from qat.trainer import BlockOrder, TrainConfig, anneal_blend, lm_loss, train

SMALL = dict(hidden=64, intermediate=128)


def test_anneal_blend_ramps_from_zero_to_one_then_stays():
    steps, frac = 100, 0.4
    values = [anneal_blend(s, steps, frac) for s in range(steps)]
    assert values[0] == 0.0
    assert all(b2 >= b1 for b1, b2 in zip(values, values[1:]))  # monotone
    assert 0.4 < values[20] < 0.6  # half-way up the cosine ramp at 20% of the run
    assert all(v == 1.0 for v in values[40:])  # fully quantized after the ramp
    assert all(anneal_blend(s, steps, 0.0) == 1.0 for s in range(steps))  # the paper: quantized from step 0


@pytest.mark.parametrize("blend", [0.0, 0.3, 1.0])
def test_blended_forward_and_gradients(blend):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    q = QuantLinear.from_linear(copy.deepcopy(linear), 2)
    q.blend = blend
    x = torch.randn(4, 64)
    out = q(x)
    wq = fake_quantize(q.weight, q.alpha, q.grid)
    expected = torch.nn.functional.linear(x, q.weight + blend * (wq - q.weight), q.bias)
    torch.testing.assert_close(out, expected)
    if blend == 0.0:  # the float model exactly
        torch.testing.assert_close(out, linear(x))
    out.sum().backward()  # a linear loss: the gradient reaching the blended weight does not depend on blend
    q_hard = QuantLinear.from_linear(copy.deepcopy(linear), 2)
    q_hard(x).sum().backward()
    torch.testing.assert_close(q.alpha.grad, blend * q_hard.alpha.grad)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_mse_alpha_init_never_fits_worse_than_the_paper(bits):
    torch.manual_seed(1)
    w = torch.randn(32, 256) * torch.rand(32, 1)  # rows of different scales
    grid = grid_for_bits(bits)

    def err(alpha):
        return (fake_quantize(w, alpha, grid) - w).pow(2).sum(dim=-1)

    paper, mse = init_alpha(w, grid), init_alpha(w, grid, "mse")
    assert torch.all(err(mse) <= err(paper) + 1e-6)
    if bits in (1.58, 2.0, 3.0):  # max-based inits are far from the least-squares fit on Gaussian rows
        assert err(mse).sum() < 0.7 * err(paper).sum()


def test_unknown_alpha_init_is_refused():
    with pytest.raises(ValueError, match="alpha init"):
        QATConfig(bits=2, alpha_init="best")


def test_recipe_overrides_and_names():
    assert recipe("paper").anneal_frac == 0.0 and recipe("paper").alpha_init == "paper"
    assert recipe("paper", anneal_frac=0.25, distill_weight=None).anneal_frac == 0.25
    assert recipe("paper", distill_weight=None).distill_weight == 0.0  # None: not given
    assert "default" in RECIPES
    with pytest.raises(ValueError, match="unknown"):
        recipe("fastest")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        recipe("paper", warmup=3)


@pytest.fixture(scope="module")
def blocks():
    return pack_blocks(tiny_tokenizer(), [TINY_TEXT] * 40, block_size=32, heldout_fraction=0.1)


def _config(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=2, lr=1e-3, eval_every=0, eval_at_start=False, progress=False, log_every=1,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_annealed_training_starts_at_the_float_loss_and_ends_quantized(blocks):
    train_blocks, heldout = blocks
    float_model = tiny_model("llama", **SMALL)
    model = prepare(copy.deepcopy(float_model), QATConfig(bits=2, alpha_init="mse"))
    seen = []
    for module in quantized_modules(model).values():  # record the blend each forward sees
        module.register_forward_pre_hook(lambda m, _: seen.append(m.blend))
    result = train(model, train_blocks, heldout, _config(anneal_frac=0.5, eval_every=3))
    assert seen[0] == 0.0 and max(seen) == 1.0 and any(0 < b < 1 for b in seen)
    assert all(m.blend == 1.0 for m in quantized_modules(model).values())  # left fully quantized
    assert len(result.heldout_ppl) == 2
    # the first step runs the float model: its loss is the float model's own on the same blocks
    order = BlockOrder(len(train_blocks), 0)
    ids = train_blocks[[order[i] for i in range(2)]]
    with torch.no_grad():
        float_loss = lm_loss(float_model(input_ids=ids).logits, ids).item()
    assert result.loss_history[0] == (1, pytest.approx(float_loss, rel=1e-5))


def test_evaluation_mid_anneal_measures_the_quantized_model(blocks):
    train_blocks, heldout = blocks
    model = prepare(tiny_model("llama", **SMALL), QATConfig(bits=2))
    set_blend(model, 0.0)
    from qat.trainer import evaluate_perplexity

    soft = evaluate_perplexity(model, heldout, 2)
    set_blend(model, 1.0)
    hard = evaluate_perplexity(model, heldout, 2)
    assert soft != hard  # the blend changes the model, so evaluating at 1.0 matters
    result = train(model, train_blocks, heldout, _config(steps=2, anneal_frac=0.9, eval_at_start=True))
    assert result.heldout_ppl[0][1] == pytest.approx(hard, rel=1e-6)  # step 0 evaluated fully quantized


def test_alpha_learning_rate_scale_makes_a_second_group(blocks):
    train_blocks, _ = blocks
    base = prepare(tiny_model("llama", **SMALL), QATConfig(bits=2))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train(a, train_blocks, None, _config(steps=1, warmup_steps=0))
    train(b, train_blocks, None, _config(steps=1, warmup_steps=0, alpha_lr_scale=10.0))
    for (name, qa), qb in zip(quantized_modules(a).items(), quantized_modules(b).values()):
        start = quantized_modules(base)[name].alpha.detach()
        moved_a = float((qa.alpha.detach() - start).abs().max())
        moved_b = float((qb.alpha.detach() - start).abs().max())
        # Adam's first step moves each parameter by ~lr: ten times further at ten times the lr
        assert moved_b == pytest.approx(10 * moved_a, rel=1e-3)
        torch.testing.assert_close(qa.weight, qb.weight)  # the weights' lr is unchanged


def test_bad_recipe_settings_are_refused():
    with pytest.raises(ValueError, match="anneal_frac"):
        TrainConfig(anneal_frac=1.0)
    with pytest.raises(ValueError, match="alpha_lr_scale"):
        TrainConfig(alpha_lr_scale=0)


@pytest.mark.parametrize("flags, expect", [
    ([], {"name": "default", "alpha_init": "mse", "anneal_frac": 0.4, "alpha_lr_scale": 10.0,
          "distill_weight": 1.0, "lr": 1e-3, "table": 4}),
    (["--embedding-bits", "float"], {"name": "default", "alpha_init": "mse", "anneal_frac": 0.4,
                                     "alpha_lr_scale": 10.0, "distill_weight": 1.0, "lr": 1e-3, "table": None}),
    (["--embedding-bits", "8"], {"name": "default", "alpha_init": "mse", "anneal_frac": 0.4, "alpha_lr_scale": 10.0,
                                 "distill_weight": 1.0, "lr": 1e-3, "table": 8}),
    (["--recipe", "paper"], {"name": "paper", "alpha_init": "paper", "anneal_frac": 0.0, "alpha_lr_scale": 1.0,
                             "distill_weight": 0.0, "lr": 2e-5, "table": None}),
    (["--recipe", "paper", "--anneal-frac", "0.25", "--alpha-init", "mse", "--lr", "3e-4", "--distill", "0.5"],
     {"name": "paper", "alpha_init": "mse", "anneal_frac": 0.25, "alpha_lr_scale": 1.0, "distill_weight": 0.5,
      "lr": 3e-4, "table": None}),
])
def test_cli_qat_applies_and_records_the_recipe(tmp_path, flags, expect):
    from tiny_models import save_tiny_model_dir

    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from paretoq_export.cli import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny", hidden=64, intermediate=128)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {TINY_TEXT}" for i in range(40)))
    out = tmp_path / "ck"
    assert main(["qat", "--model", str(model_dir), "--bits", "2", "--data", str(text), "--steps", "3",
                 "--batch-size", "2", "--block-size", "32", "-o", str(out), *flags]) == 0
    checkpoint = QuantizedCheckpoint.load(out)
    saved = checkpoint.recipe
    assert saved["recipe"]["name"] == expect["name"]
    assert saved["qat_config"]["embedding_bits"] == expect["table"]
    tables = [q.grid.bits for name, q in checkpoint.quantized.items() if "embed_tokens" in name]
    assert tables == ([] if expect["table"] is None else [expect["table"]])  # the table itself, not only the record
    assert saved["qat_config"]["alpha_init"] == expect["alpha_init"]
    train_cfg = saved["train"]
    for key in ("anneal_frac", "alpha_lr_scale", "distill_weight", "lr"):
        assert train_cfg[key] == pytest.approx(expect[key]), key


def test_cli_qat_with_teacher_data_keep_best_and_determinism(tmp_path):
    """--data teacher:N mixed with text, keep-best on by default with held-out data, --deterministic: two runs give
    the same codes and steps; eval never samples the teacher."""
    from tiny_models import save_tiny_model_dir

    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from paretoq_export.cli import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny", hidden=64, intermediate=128)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {TINY_TEXT}" for i in range(40)))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["qat", "--model", str(model_dir), "--bits", "2", "--data", "teacher:512", str(text),
                     "--steps", "4", "--eval-every", "2", "--batch-size", "2", "--block-size", "32",
                     "--teacher-batch-size", "4", "--deterministic", "-o", str(out)]) == 0
        runs.append(QuantizedCheckpoint.load(out))
    a, b = runs
    assert a.recipe["train"]["keep_best"] is None and a.recipe["kept_step"] in (0, 2, 4)
    assert a.recipe["data"]["sources"][0] == "teacher:512"
    for name, q in a.quantized.items():
        assert torch.equal(q.codes, b.quantized[name].codes) and torch.equal(q.scale, b.quantized[name].scale)
    assert main(["eval", str(tmp_path / "a"), "--data", "teacher:512", "--heldout-data", str(text),
                 "--block-size", "32"]) == 0


@pytest.mark.parametrize("bits, table", [(1, 4), (1.58, 4), (2, 4), (3, 8), (4, 8)])
def test_default_recipe_table_follows_width_unless_named(bits, table):
    """The default recipe quantizes the embedding table (4-bit below 3 bits, 8-bit at 3/4); a width the user names
    (embedding or lm_head) wins, and the paper recipe keeps the table float."""
    from qat.prepare import QATConfig
    from qat.recipe import with_recipe_table

    assert with_recipe_table(recipe("default"), QATConfig(bits=bits)).embedding_bits == table
    assert with_recipe_table(recipe("default"), QATConfig(bits=2, overrides={"down_proj": bits})).embedding_bits == (
        4 if bits <= 2 else 8)  # the widest grid decides
    assert with_recipe_table(recipe("default"), QATConfig(bits=bits, embedding_bits=8)).embedding_bits == 8
    named_head = with_recipe_table(recipe("default"), QATConfig(bits=bits, lm_head_bits=8))
    assert named_head.embedding_bits is None and named_head.lm_head_bits == 8
    assert with_recipe_table(recipe("paper"), QATConfig(bits=bits)).embedding_bits is None


@pytest.mark.parametrize("bits, group_size, lr", [(2, None, 1e-3), (2, 32, 1e-3), (4, None, 5e-4), (4, 32, 3e-5),
                                                  (3, 64, 3e-5), (3, None, 5e-4)])
def test_default_recipe_lr_follows_width_and_scale_granularity(bits, group_size, lr):
    """Group-wise 3/4-bit steps start close to the float model and train at a far lower lr than per-row ones."""
    from qat.prepare import QATConfig
    from qat.recipe import apply_recipe

    qat_config, train_config = apply_recipe(recipe("default"), QATConfig(bits=bits, group_size=group_size),
                                            TrainConfig())
    assert train_config.lr == pytest.approx(lr)
    _, explicit = apply_recipe(recipe("default"), qat_config, TrainConfig(lr=1e-4))
    assert explicit.lr == pytest.approx(1e-4)  # an lr the user gave always wins
