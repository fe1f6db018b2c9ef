"""The QAT training loop on tiny random models: learning, alphas, resume, accumulation, distillation, DDP."""

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_TEXT, tiny_model, tiny_tokenizer

from qat.data import pack_blocks
from qat.prepare import QATConfig, prepare, quantized_modules
from qat.trainer import (
    TrainConfig,
    cosine_schedule,
    default_lr,
    evaluate_perplexity,
    max_quantized_bits,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden=64, intermediate=128)  # fast; the 256-wide default is used where learning is measured


@pytest.fixture(scope="module")
def blocks():
    docs = [TINY_TEXT] * 40  # a repeated tiny corpus: learnable in a few dozen steps
    train_blocks, heldout = pack_blocks(tiny_tokenizer(), docs, block_size=32, heldout_fraction=0.1)
    return train_blocks, heldout


@pytest.fixture(scope="module")
def random_blocks():
    """Unrelated blocks: their gradients differ in sign, so feeding the wrong block to a step shows in the update
    (Adam's first steps move each weight by ~lr * sign(grad), which near-identical blocks would hide)."""
    return torch.randint(3, 320, (16, 32), generator=torch.Generator().manual_seed(0))


def quiet(**kw) -> TrainConfig:
    # CPU even where CUDA exists: bit-exact comparisons need it (and bf16 autocast is CUDA-only anyway)
    base = dict(steps=2, batch_size=2, lr=1e-3, eval_every=0, eval_at_start=False, progress=False, log_every=1,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def small_qat_model(bits=2, **kw):
    return prepare(tiny_model("llama", **SMALL, **kw), QATConfig(bits=bits))


def test_default_lr_follows_the_paper():
    assert default_lr(1) == default_lr(1.58) == default_lr(2) == 2e-5
    assert default_lr(3) == default_lr(4) == 1e-5
    assert max_quantized_bits(small_qat_model(2)) == 2
    mixed = prepare(tiny_model("llama", **SMALL), QATConfig(bits=2, overrides={"down_proj": 4}, embedding_bits=8))
    assert max_quantized_bits(mixed) == 4  # the 8-bit embedding is a size option, not a ParetoQ grid
    assert max_quantized_bits(tiny_model("llama", **SMALL)) is None


def test_cosine_schedule_with_warmup():
    f = cosine_schedule(steps=10, warmup_steps=2, min_lr_ratio=0.0)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert cosine_schedule(10, 0, 0.1)(10) == pytest.approx(0.1)


def test_config_errors():
    with pytest.raises(ValueError, match="fsdp2.* not implemented"):
        TrainConfig(parallel="fsdp2")
    with pytest.raises(ValueError, match="need output_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="needs a teacher"):
        train(small_qat_model(), torch.zeros(4, 8, dtype=torch.long), None, quiet(distill_weight=0.5))


def test_evaluate_perplexity_is_token_weighted_ce(blocks):
    model = tiny_model("llama", **SMALL)
    _, heldout = blocks
    with torch.no_grad():
        expected = math.exp(model(input_ids=heldout, labels=heldout).loss.item())
    assert evaluate_perplexity(model, heldout, batch_size=3) == pytest.approx(expected, rel=1e-5)
    one_batch = evaluate_perplexity(model, heldout, batch_size=2, max_batches=1)
    with torch.no_grad():
        assert one_batch == pytest.approx(math.exp(model(input_ids=heldout[:2], labels=heldout[:2]).loss.item()),
                                          rel=1e-5)


def test_2bit_llama_learns_and_alphas_move(blocks):
    train_blocks, heldout = blocks
    model = prepare(tiny_model("llama"), QATConfig(bits=2))
    alphas = {n: m.alpha.detach().clone() for n, m in quantized_modules(model).items()}
    result = train(model, train_blocks, heldout,
                   quiet(steps=30, batch_size=4, lr=2e-3, eval_every=15, eval_at_start=True, log_every=5))
    assert result.steps == 30 and result.tokens_per_s > 0 and result.lr == 2e-3
    assert [s for s, _ in result.heldout_ppl] == [0, 15, 30]
    first_loss, last_loss = result.loss_history[0][1], result.final_loss
    assert last_loss < 0.5 * first_loss, result.loss_history
    assert result.heldout_ppl[-1][1] < 0.2 * result.heldout_ppl[0][1], result.heldout_ppl
    moved = [n for n, m in quantized_modules(model).items() if not torch.equal(m.alpha, alphas[n])]
    assert len(moved) == len(alphas)  # every layer's per-row steps were trained
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert not model.training  # mode restored (tiny_model returns it in eval mode)


def test_resume_is_bit_exact(random_blocks, tmp_path):
    train_blocks, heldout = random_blocks[:12], random_blocks[12:]
    cfg = dict(steps=4, warmup_steps=1, grad_accum=2, eval_every=2)

    straight = small_qat_model()
    train(straight, train_blocks, heldout, quiet(**cfg))

    first = small_qat_model()
    part = train(first, train_blocks, heldout, quiet(**cfg, output_dir=str(tmp_path), stop_after=2))
    assert part.steps == 2 and (tmp_path / "trainer_state.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    resumed = small_qat_model(seed=123)  # different init: everything must come from the checkpoint
    result = train(resumed, train_blocks, heldout, quiet(**cfg, output_dir=str(tmp_path), resume=True))
    assert result.steps == 4 and [s for s, _ in result.heldout_ppl] == [2, 4]

    a, b = params(straight), params(resumed)
    assert a.keys() == b.keys() and any(k.endswith("alpha") for k in a)
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched

    with pytest.raises(ValueError, match="different data order.*batch_size: 2 -> 4"):
        train(small_qat_model(), train_blocks, heldout,
              quiet(**{**cfg, "batch_size": 4}, output_dir=str(tmp_path), resume=True))


def test_grad_accumulation_matches_a_bigger_batch(random_blocks):
    train_blocks = random_blocks
    one = small_qat_model()
    two = small_qat_model()
    r1 = train(one, train_blocks, None, quiet(steps=2, batch_size=2, grad_accum=1, lr=1e-4))
    r2 = train(two, train_blocks, None, quiet(steps=2, batch_size=1, grad_accum=2, lr=1e-4))
    assert [loss for _, loss in r1.loss_history] == pytest.approx([loss for _, loss in r2.loss_history], rel=1e-6)
    start = params(small_qat_model())
    a, b = params(one), params(two)
    # the update is ~lr per element; same data must give the same update up to float rounding
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 5e-5
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_gradient_checkpointing_gives_the_same_step(random_blocks):
    train_blocks = random_blocks
    plain, ckpt = small_qat_model(), small_qat_model()
    seen = []
    ckpt.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(m.gradient_checkpointing))
    train(plain, train_blocks, None, quiet())
    train(ckpt, train_blocks, None, quiet(gradient_checkpointing=True))
    assert seen and all(seen)  # it really was on while training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())  # switched off again
    a, b = params(plain), params(ckpt)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_distillation(blocks):
    train_blocks, _ = blocks
    teacher = tiny_model("llama", **SMALL)
    # a float student identical to its teacher: KL starts at 0, so the pure-distillation loss is ~0
    same = train(copy.deepcopy(teacher), train_blocks, None, quiet(steps=1, distill_weight=1.0), teacher=teacher)
    assert abs(same.loss_history[0][1]) < 1e-5
    student = prepare(copy.deepcopy(teacher), QATConfig(bits=2))
    result = train(student, train_blocks, None,
                   quiet(steps=3, distill_weight=0.5, distill_temperature=2.0), teacher=teacher)
    assert all(math.isfinite(loss) and loss > 0 for _, loss in result.loss_history)
    assert all(not p.requires_grad for p in teacher.parameters())


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from tiny_models import tiny_model
    from qat.prepare import QATConfig, prepare
    from qat.trainer import TrainConfig, train
    import torch.distributed as dist

    blocks = torch.load(sys.argv[1])
    model = prepare(tiny_model("llama", hidden=64, intermediate=128), QATConfig(bits=2))
    config = TrainConfig(steps=2, batch_size=1, lr=1e-4, eval_every=0, eval_at_start=False, progress=False,
                         log_every=1, output_dir=sys.argv[2])
    result = train(model, blocks[:8], blocks[8:12], config)
    assert not dist.is_initialized()  # the trainer destroyed the group it created
    rank = int(__import__("os").environ["RANK"])
    torch.save({"params": model.state_dict(), "loss": result.final_loss}, f"{sys.argv[2]}/rank{rank}.pt")
""")


def test_ddp_two_cpu_processes(random_blocks, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): both ranks end identical, and equal one process with the 2-block batch."""
    train_blocks = random_blocks
    torch.save(train_blocks, tmp_path / "blocks.pt")
    (tmp_path / "worker.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "blocks.pt"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["loss"] == r1["loss"]  # the logged loss is reduced over ranks
    assert (tmp_path / "trainer_state.pt").is_file()  # written by rank 0

    single = small_qat_model()
    one = train(single, train_blocks[:8], None, quiet(steps=2, batch_size=2, lr=1e-4))
    ref = params(single)
    assert max((ref[k] - r0["params"][k]).abs().max().item() for k in ref) < 1e-6
    assert one.final_loss == pytest.approx(r0["loss"], rel=1e-5)


# --------------------------------------------------------------------------------- budgets, scaling, reproducibility

OTHER_TEXT = ("Every morning the baker opens her shop at six and sells warm bread to the people of the small town "
              "near the river. ")


def test_keep_best_restores_the_best_evaluation_of_an_overfitting_run():
    """Four training blocks passed over 40 times: held-out PPL falls, then rises as the model memorises them.
    keep_best returns the weights and alphas of the best evaluation; off, the last ones."""
    tok = tiny_tokenizer()
    train_blocks = pack_blocks(tok, [TINY_TEXT] * 4, block_size=32, heldout_fraction=0)[0][:4]
    heldout = pack_blocks(tok, [OTHER_TEXT * 4] * 4, block_size=32, heldout_fraction=0)[0][:4]
    cfg = dict(steps=40, batch_size=4, lr=3e-3, eval_every=4, eval_batches=None, log_every=4)
    best_model = prepare(tiny_model("llama", **SMALL), QATConfig(bits=4))
    best = train(best_model, train_blocks, heldout, quiet(**cfg))  # keep_best defaults on with held-out data
    steps, ppls = zip(*best.heldout_ppl)
    assert steps == tuple(range(4, 41, 4))
    assert ppls[-1] > min(ppls) * 1.05, best.heldout_ppl  # it did overfit
    kept = steps[ppls.index(min(ppls))]
    assert best.kept_step == kept < 40 and best.final_heldout_ppl == min(ppls)
    assert evaluate_perplexity(best_model, heldout, batch_size=4) == pytest.approx(min(ppls), rel=1e-5)
    assert best.epochs == pytest.approx(40.0) and any("40.0 times" in w for w in best.warnings)

    last_model = prepare(tiny_model("llama", **SMALL), QATConfig(bits=4))
    last = train(last_model, train_blocks, heldout, quiet(**cfg, keep_best=False))
    assert last.heldout_ppl == best.heldout_ppl and last.kept_step is None
    assert evaluate_perplexity(last_model, heldout, batch_size=4) == pytest.approx(ppls[-1], rel=1e-5)


def test_default_eval_cadence_and_epoch_warning(random_blocks):
    assert TrainConfig(steps=1000).eval_every == 125 and TrainConfig(steps=5).eval_every == 1  # ~8 evaluations
    assert TrainConfig(steps=1000, eval_every=0).eval_every == 0
    result = train(small_qat_model(), random_blocks, None, quiet(steps=2, batch_size=2))  # 4 of 16 blocks
    assert result.epochs == pytest.approx(0.25) and not result.warnings and result.kept_step is None


def test_deterministic_runs_give_byte_identical_checkpoints(random_blocks, tmp_path):
    from qat.checkpoint_io import QATCheckpoint

    seen = []
    for run in ("a", "b"):
        model = prepare(tiny_model("llama", **SMALL), QATConfig(bits=2, embedding_bits=8))
        model.model.layers[0].register_forward_pre_hook(
            lambda m, a: seen.append(torch.are_deterministic_algorithms_enabled()))
        train(model, random_blocks[:12], random_blocks[12:], quiet(steps=3, deterministic=True, eval_every=2))
        QATCheckpoint.from_qat_model(model, tiny_tokenizer()).save(tmp_path / run)
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()  # on while training only
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.safetensors" in files
    for name in files:  # byte for byte, the weights' and config's hashes included
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_chunked_distillation_and_top_k_teacher(blocks):
    train_blocks, _ = blocks
    teacher = tiny_model("llama", **SMALL)
    runs = {}
    for name, kw in {"whole": dict(loss_chunk_tokens=100_000), "chunked": dict(loss_chunk_tokens=7),
                     "topk": dict(distill_topk=8)}.items():
        # a float student: a quantized one's level choices would amplify float rounding into different runs
        student = tiny_model("llama", **SMALL, seed=1)
        result = train(student, train_blocks, None, quiet(steps=2, distill_weight=0.5, distill_temperature=2.0, **kw),
                       teacher=teacher)
        runs[name] = (result, params(student))
    (r0, p0), (r1, p1) = runs["whole"], runs["chunked"]
    assert [v for _, v in r0.loss_history] == pytest.approx([v for _, v in r1.loss_history], rel=1e-6)
    assert max((p0[k] - p1[k]).abs().max().item() for k in p0) < 1e-6
    r2, p2 = runs["topk"]
    assert all(math.isfinite(v) for _, v in r2.loss_history) and r2.loss_history != r0.loss_history
    assert next(teacher.parameters()).dtype == torch.float32  # bf16 only on CUDA
    with pytest.raises(ValueError, match="distill_topk"):
        TrainConfig(distill_topk=-1)
