"""FSDP2 QAT under torchrun on CPU (gloo, 2 processes): equal to one process, sharded checkpoints, resume, and the
canonical checkpoint from both the gathered model and the sharded checkpoint directory."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
from qat.checkpoint_io import QATCheckpoint
from qat.distributed import load_trained_weights
from qat.prepare import QATConfig, prepare
from qat.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
COMMON = dict(lr=1e-3, eval_every=2, eval_at_start=False, progress=False, log_every=1, max_grad_norm=1.0,
              warmup_steps=1)

WORKER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from tiny_models import tiny_model
    from qat.prepare import QATConfig, prepare
    from qat.trainer import TrainConfig, train

    blocks, out, steps, common = torch.load(sys.argv[1]), sys.argv[2], int(sys.argv[3]), eval(sys.argv[4])
    # one group for the three runs (the trainer uses a group it finds and leaves it): re-creating a group under
    # the same torchrun store after destroying one hangs
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def model(seed=0):
        return prepare(tiny_model("llama", hidden=64, intermediate=128, seed=seed), QATConfig(bits=2))

    def config(out_dir, **kw):
        return TrainConfig(steps=steps, batch_size=1, grad_accum=2, parallel="fsdp", output_dir=out_dir,
                           **common, **kw)

    straight = model()
    result = train(straight, blocks[:12], blocks[12:], config(f"{out}/straight"))
    torch.save({"params": straight.state_dict(), "loss": result.loss_history, "ppl": result.heldout_ppl},
               f"{out}/straight_rank{rank}.pt")

    part = train(model(), blocks[:12], blocks[12:], config(f"{out}/split", stop_after=steps - 1))
    assert part.steps == steps - 1
    resumed = model(seed=123)  # a different init: everything must come from the sharded checkpoint
    result = train(resumed, blocks[:12], blocks[12:], config(f"{out}/split", resume=True))
    torch.save({"params": resumed.state_dict(), "steps": result.steps}, f"{out}/resumed_rank{rank}.pt")
    dist.destroy_process_group()
""")


def _model(seed=0):
    return prepare(tiny_model("llama", hidden=64, intermediate=128, seed=seed), QATConfig(bits=2))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    blocks = torch.randint(3, 320, (16, 32), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, tmp / "blocks.pt")
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp / "worker.py"), str(tmp / "blocks.pt"), str(tmp), str(STEPS), repr(COMMON)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    single = _model()
    one = train(single, blocks[:12], blocks[12:],
                TrainConfig(steps=STEPS, batch_size=2, grad_accum=2, device="cpu", **COMMON))
    return tmp, single, one


def test_fsdp_two_processes_match_one(fsdp_run):
    tmp, single, one = fsdp_run
    r0, r1 = (torch.load(tmp / f"straight_rank{r}.pt") for r in (0, 1))
    # every rank ends with the full gathered model, identical on both
    assert r0["params"].keys() == r1["params"].keys() == single.state_dict().keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["loss"] == r1["loss"] and r0["ppl"] == r1["ppl"]  # reduced over ranks
    # the same global batch (2 ranks x 1 block x 2 micro-batches = 1 rank x 2 x 2): same losses and weights up
    # to float rounding (the mean over the batch is summed in a different order)
    ref = single.state_dict()
    start = _model().state_dict()
    moved = max((ref[k] - start[k]).abs().max().item() for k in ref)
    assert moved > 5e-4  # lr 1e-3: the comparison below is far below a step
    diffs = torch.cat([(ref[k] - r0["params"][k]).abs().flatten() for k in ref])
    # Adam divides by sqrt(v): on the few weights whose gradient is ~0, summation-order noise becomes a visible
    # fraction of a step; everywhere else the runs agree to float rounding
    assert diffs.max() < 0.01 * moved, diffs.max()
    assert (diffs > 1e-7).float().mean() < 1e-3
    assert [s for s, _ in r0["loss"]] == [s for s, _ in one.loss_history] == list(range(1, STEPS + 1))
    assert [v for _, v in r0["loss"]] == pytest.approx([v for _, v in one.loss_history], rel=1e-6)
    assert [p for _, p in r0["ppl"]] == pytest.approx([p for _, p in one.heldout_ppl], rel=1e-6)
    alphas = [k for k in ref if k.endswith("alpha")]
    assert alphas and all(not torch.equal(ref[k], start[k]) for k in alphas)  # alphas trained under sharding


def test_fsdp_sharded_checkpoint_resume(fsdp_run):
    tmp, _, _ = fsdp_run
    straight = torch.load(tmp / "straight_rank0.pt")["params"]
    for rank in (0, 1):
        resumed = torch.load(tmp / f"resumed_rank{rank}.pt")
        assert resumed["steps"] == STEPS
        mismatched = [k for k in straight if not torch.equal(straight[k], resumed["params"][k])]
        assert not mismatched, mismatched  # bit-exact, as the single-process resume
    # only the newest sharded checkpoint is kept; trainer_state.pt names it
    assert [p.name for p in (tmp / "split" / "trainer_state_dcp").iterdir()] == [f"step_{STEPS:07d}"]
    saved = torch.load(tmp / "split" / "trainer_state.pt", weights_only=False)
    assert "model" not in saved and saved["dcp"].endswith(f"step_{STEPS:07d}") and saved["world_size"] == 2
    with pytest.raises(ValueError, match="parallel='fsdp'.*same setting"):  # sharded state, unsharded run
        train(_model(), torch.zeros(4, 8, dtype=torch.long), None,
              TrainConfig(steps=STEPS, batch_size=2, device="cpu", output_dir=str(tmp / "split"), resume=True,
                          progress=False))


def test_fsdp_canonical_checkpoint_equals_one_process(fsdp_run):
    tmp, single, _ = fsdp_run
    one_ckpt = QATCheckpoint.from_qat_model(single)

    gathered = _model(seed=7)
    gathered.load_state_dict(torch.load(tmp / "straight_rank0.pt")["params"])
    from_dcp = _model(seed=7)
    assert load_trained_weights(from_dcp, tmp / "straight") == STEPS  # one process reads the 2-rank shards
    dcp_state, gathered_state = from_dcp.state_dict(), gathered.state_dict()
    assert all(torch.equal(dcp_state[k], gathered_state[k]) for k in gathered_state)

    for model in (gathered, from_dcp):
        ckpt = QATCheckpoint.from_qat_model(model)
        assert ckpt.quantized.keys() == one_ckpt.quantized.keys()
        total = differ = 0
        for key, q in one_ckpt.quantized.items():
            other = ckpt.quantized[key]
            # fp16 steps: the fp32 alphas differ by < 1e-6 relative, below fp16's 1e-3 rounding
            assert torch.equal(q.scale, other.scale), key
            total += q.codes.numel()
            differ += int((q.codes != other.codes).sum())
        # codes: equal except where a latent weight sits within float rounding of a level boundary
        assert differ <= max(1, total // 100_000), (differ, total)
        for key, tensor in one_ckpt.tensors.items():  # float16 embeddings and norms: equal to fp16 rounding
            torch.testing.assert_close(ckpt.tensors[key], tensor, rtol=1e-3, atol=1e-5)


def test_fsdp_checkpoint_exports_to_gguf(fsdp_run, tmp_path):
    """FSDP shards -> one-process model -> canonical checkpoint -> GGUF, read back bit-exact."""
    from tiny_models import tiny_tokenizer

    from formats.gguf import GGUFOptions, export_gguf
    from formats.gguf_readback import verify_gguf_readback

    tmp, _, _ = fsdp_run
    model = _model(seed=7)
    load_trained_weights(model, tmp / "straight")
    ckpt_dir = QATCheckpoint.from_qat_model(model, tiny_tokenizer()).save(tmp_path / "ckpt")
    result = export_gguf(ckpt_dir, tmp_path / "fsdp.gguf", GGUFOptions(progress=False))
    report = verify_gguf_readback(result.path, QuantizedCheckpoint.load(ckpt_dir))
    assert report["bit_exact"] and report["exact"] == report["tensors"] > 0, report


def test_load_trained_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trainer_state.pt"):
        load_trained_weights(_model(), tmp_path)
