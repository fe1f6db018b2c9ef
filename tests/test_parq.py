"""PARQ baseline (qat/parq.py): torchao's QuantOptimizer trains a tiny model onto our grids, and the result converts
to the canonical checkpoint with PARQ's own codes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao.prototype.parq")

from tiny_models import tiny_model  # noqa: E402

from paretoq_export.canonical.checkpoint import QuantizedCheckpoint  # noqa: E402
from paretoq_export.canonical.grids import grid_for_bits  # noqa: E402
from qat.parq import (  # noqa: E402
    PARQConfig,
    build_quant_optimizer,
    on_grid_fraction,
    parq_checkpoint,
    quantized_parameters,
    train_parq,
)
from qat.trainer import TrainConfig  # noqa: E402

STEPS = 4


def _small_model():
    return tiny_model(hidden=64, intermediate=128, layers=1)


def _blocks(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(seed))


def _train(bits, prox="parq"):
    model = _small_model()
    blocks = _blocks()
    before = {id(p): p.detach().clone() for p in quantized_parameters(model)}
    result = train_parq(model, blocks, blocks[:2], PARQConfig(bits=bits, prox=prox),
                        TrainConfig(steps=STEPS, batch_size=2, lr=2e-3, warmup_steps=1, eval_every=0, progress=False,
                                    device="cpu"))
    return model, blocks, before, result


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
def test_parq_grid_matches_ours(bits):
    """Each bits' PARQ quantizer has our grid's number of levels, equally spaced like ours (so codes map 1:1)."""
    model = _small_model()
    config = PARQConfig(bits=bits, prox="hard")
    optimizer = build_quant_optimizer(model, config, steps=2, lr=1e-3)
    model(input_ids=_blocks()[:2]).logits.float().pow(2).mean().backward()
    optimizer.step()
    grid = grid_for_bits(bits)
    for p in quantized_parameters(model):
        quants = optimizer.state[p]["quants"]
        assert quants.shape == (p.shape[0], grid.n_codes)
        step = quants[:, 1:] - quants[:, :-1]
        torch.testing.assert_close(step, step[:, :1].expand_as(step), rtol=1e-5, atol=0)
        # our grid in units of the step: (q - zero) for q = 0..n-1, e.g. -4..3 for lsq3, -0.5/+0.5 for binary
        expected = torch.arange(grid.n_codes, dtype=torch.float32) - grid.zero
        torch.testing.assert_close(quants / step[:, :1], expected.expand_as(quants), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [1.58, 3])
def test_parq_training_ends_on_grid_and_converts_exactly(bits):
    model, blocks, before, result = _train(bits)
    assert result.steps == STEPS and torch.isfinite(torch.tensor(result.final_loss))
    assert result.heldout_ppl and result.heldout_ppl[-1][0] == STEPS
    params = quantized_parameters(model)
    assert any(not torch.equal(p.detach(), before[id(p)]) for p in params), "training changed nothing"
    assert on_grid_fraction(model, bits) == 1.0

    # PARQ's own codes: w / s + zero with s its float32 step, the smallest gap between a row's distinct values
    # (PARQ's grid is ours, see test_parq_grid_matches_ours)
    grid = grid_for_bits(bits)
    names = {id(m.weight): n for n, m in model.named_modules() if hasattr(m, "weight")}
    ckpt = parq_checkpoint(model, bits, recipe={"test": True})
    assert ckpt.recipe["method"] == "parq"
    for p in params:
        q = ckpt.quantized[f"{names[id(p)]}.weight"]
        assert q.grid == grid
        w = p.detach().float()
        parq_step = torch.stack([row.unique().diff().min() for row in w]).unsqueeze(1)
        assert torch.equal(torch.round(w / parq_step + grid.zero).to(torch.uint8), q.codes)
        # the checkpoint's fp16 step is PARQ's step rounded (relative 2^-11), so the weights agree that closely
        torch.testing.assert_close(q.scale.float().unsqueeze(1), parq_step, rtol=2.0**-10, atol=0)
        err = (q.dequantize() - w).abs().amax(dim=-1) / w.abs().amax(dim=-1)
        assert float(err.max()) < 2.0**-10

    # the rebuilt reference model computes what the PARQ model computes
    reference = ckpt.build_reference_model()
    with torch.no_grad():
        ours = reference(input_ids=blocks[:2]).logits
        theirs = model.eval()(input_ids=blocks[:2]).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-3)


def test_parq_checkpoint_round_trips_disk(tmp_path):
    model, blocks, _, _ = _train(2, prox="hard")
    saved = parq_checkpoint(model, 2).save(tmp_path / "ckpt")
    loaded = QuantizedCheckpoint.load(saved)
    assert loaded.recipe["method"] == "parq"
    for key, q in parq_checkpoint(model, 2).quantized.items():
        assert torch.equal(loaded.quantized[key].codes, q.codes)


def test_parq_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unsupported bits"):
        PARQConfig(bits=5)
    with pytest.raises(ValueError, match="8 unsupported"):
        PARQConfig(bits=8)
    with pytest.raises(ValueError, match="proximal map"):
        PARQConfig(prox="soft")
    with pytest.raises(ValueError, match="anneal"):
        PARQConfig(anneal_start_frac=0.9, anneal_end_frac=0.5)
    with pytest.raises(ValueError, match="learning rate"):
        train_parq(_small_model(), _blocks(), None, PARQConfig(), TrainConfig(steps=1, lr=None))
