"""`paretoq-export pareto` on a tiny model: 2-bit QAT + float, GGUF, validated and benchmarked in llama.cpp; table,
plots, resumable cells (a rerun retrains nothing), corrupt cells recomputed, the frontier on hand-made points."""

from __future__ import annotations

import json

import pytest

from paretoq_export import pipeline
from paretoq_export.cli import main
from paretoq_export.pareto import FLOAT_BITS, ParetoConfig, ParetoError, ParetoRun, pareto_frontier
from tiny_models import TINY_TEXT, save_tiny_model_dir

pytest.importorskip("llama_cpp")
pytest.importorskip("matplotlib")


def test_frontier_is_lower_left_envelope():
    points = [
        (10.0, 5.0),  # 0: frontier (smallest x)
        (12.0, 6.0),  # 1: dominated by 0
        (20.0, 3.0),  # 2: frontier
        (20.0, 4.0),  # 3: same x as 2, worse y
        (25.0, 3.0),  # 4: same y as 2, larger x: dominated
        (40.0, 1.0),  # 5: frontier
        (30.0, 2.0),  # 6: frontier
        (10.0, 5.0),  # 7: duplicate of 0
        (50.0, 1.5),  # 8: dominated by 5
    ]
    assert pareto_frontier(points) == [0, 2, 6, 5]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 1.0)]) == [0]
    # every point off the frontier is beaten on both axes (or tied on one) by a frontier point
    front = set(pareto_frontier(points))
    for i, (x, y) in enumerate(points):
        if i not in front:
            assert any(points[j][0] <= x and points[j][1] <= y for j in front)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pareto-in")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {TINY_TEXT}" for i in range(60)))
    return {"model": str(save_tiny_model_dir(d / "tiny-llama")), "text": str(text)}


def _config(inputs, out, **kw) -> ParetoConfig:
    base = dict(output_dir=out, model=inputs["model"], bits=["2", "16"], formats=["gguf"], method="qat", steps=2,
                budget="paper", data=[inputs["text"]], block_size=32, batch_size=2, lr=1e-3, eval_blocks=2,
                validate_tokens=64, validate_text=inputs["text"], repeats=1, pp=32, tg=8, progress=False)
    base.update(kw)
    return ParetoConfig(**base)


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pareto-out")
    run = ParetoRun(_config(inputs, out))
    cells = run.run()
    return out, run, cells


def test_sweep_writes_cells_table_and_plots(first_run):
    out, run, cells = first_run
    assert sorted(run.computed) == ["2bit-gguf", "checkpoint-2bit", "checkpoint-float", "float-gguf"]
    by_label = {c["label"]: c for c in cells}
    q2, fp = by_label["2bit"], by_label["float"]
    assert q2["checkpoint"]["steps"] == 6 and q2["checkpoint"]["method"] == "qat"  # paper budget: 3 x 2 steps
    assert q2["checkpoint"]["train_tokens"] == 6 * 2 * 32
    assert fp["checkpoint"]["steps"] == 0 and fp["bits"] == FLOAT_BITS and fp["checkpoint"]["method"] == "float"
    for c in cells:
        assert c["size_bytes"] == (out / "artifacts" / f"{c['label']}.gguf").stat().st_size
        assert c["checkpoint"]["heldout_ppl"] > 1
        m = c["validation"]["metrics"]
        assert abs(m["ppl_ratio"] - 1) < 0.05 and m["top1"] > 0.8  # the GGUF runs the checkpoint's model
        assert c["bench"]["tg_tps"]["median"] > 0 and c["bench"]["bound_tg_tps"] > 0
    assert q2["size_bytes"] < fp["size_bytes"] and q2["bits_per_weight"] < fp["bits_per_weight"] / 2
    assert (out / "checkpoints" / "2bit" / "config.json").is_file()
    table = (out / "pareto.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "gguf" in ln]
    assert len(rows) == 2 and rows[0].startswith("| 2 | qat | 6 / 384 | gguf") and rows[1].startswith("| float |")
    for name in ("pareto_size.png", "pareto_latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "pareto.json").read_text())
    assert [c["label"] for c in saved["cells"]] == ["2bit", "float"]


def test_rerun_skips_finished_cells(first_run, inputs, monkeypatch):
    out, _, cells = first_run
    watched = sorted((out / "cells").glob("*.json")) + [out / "checkpoints" / "2bit" / "model.safetensors",
                                                        out / "artifacts" / "2bit.gguf"]
    mtimes = {p: p.stat().st_mtime_ns for p in watched}

    def no_training(*a, **k):
        raise AssertionError("a finished checkpoint was trained again")

    monkeypatch.setattr(pipeline, "run_qat", no_training)
    run = ParetoRun(_config(inputs, out))
    again = run.run()
    assert run.computed == []
    assert [c["bench"] for c in again] == [c["bench"] for c in cells]
    assert {p: p.stat().st_mtime_ns for p in watched} == mtimes


def test_corrupt_cell_is_recomputed_without_retraining(first_run, inputs, monkeypatch):
    out, _, _ = first_run
    cell = out / "cells" / "2bit-gguf.json"
    cell.write_text('{"version": 1, "settings": {"trunc')
    checkpoint_mtime = (out / "checkpoints" / "2bit" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "run_qat", lambda *a, **k: pytest.fail("retrained"))
    run = ParetoRun(_config(inputs, out))
    run.run()
    assert run.computed == ["2bit-gguf"]
    assert json.loads(cell.read_text())["label"] == "2bit"
    assert (out / "checkpoints" / "2bit" / "model.safetensors").stat().st_mtime_ns == checkpoint_mtime


def test_cli_errors_are_one_line(first_run, inputs, capsys):
    out, _, _ = first_run

    def error(argv):
        assert main(["pareto", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines and lines[-1].startswith("error: "), lines
        return lines[-1]

    common = ["--model", inputs["model"], "--bits", "2", "16", "--data", inputs["text"], "--block-size", "32",
              "--batch-size", "2", "--lr", "1e-3", "--eval-blocks", "2", "--validate-tokens", "64", "--validate-text",
              inputs["text"], "--repeats", "1", "--pp", "32", "--tg", "8", "--output-dir", str(out)]
    # the same folder with another budget: refused, naming the setting, nothing recomputed
    assert "other settings (steps)" in error([*common, "--steps", "5"])
    assert "unknown format(s) tflite" in error([*common, "--steps", "2", "--formats", "gguf,tflite"])
    assert "unsupported bits '5'" in error([*common[:2], "--bits", "5", "--output-dir", str(out)])


def test_equal_budget_and_rtn_steps(tmp_path):
    paper = ParetoConfig(output_dir=tmp_path, bits=["1.58", "2", "3", "4", "16"], steps=10, budget="paper")
    equal = ParetoConfig(output_dir=tmp_path, bits=["1.58", "2", "3", "4", "16"], steps=10, budget="equal")
    rtn = ParetoConfig(output_dir=tmp_path, bits=["2", "4"], method="rtn")
    assert [paper.steps_for(b) for b in paper.bit_widths()] == [30, 30, 10, 10, 0]
    assert [equal.steps_for(b) for b in equal.bit_widths()] == [10, 10, 10, 10, 0]
    assert [rtn.steps_for(b) for b in rtn.bit_widths()] == [0, 0]
    with pytest.raises(ParetoError, match="--budget"):
        ParetoConfig(output_dir=tmp_path, budget="triple")


def test_baselines_add_the_runtimes_own_files_and_a_second_frontier(first_run, inputs):
    """--baselines on the same folder: the QAT cells are reused, llama.cpp's own quantizations of the float model
    are made, measured in llama.cpp on the same tokens, tabled and drawn."""
    import gguf

    out, _, _ = first_run
    run = ParetoRun(_config(inputs, out, baselines=True))
    cells = run.run()
    assert sorted(run.computed) == sorted(f"baseline-gguf-{k}" for k in ("Q8_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"))
    base = {c["baseline"]: c for c in cells if c.get("baseline")}
    ours = {c["label"]: c for c in cells if not c.get("baseline")}
    for kind, cell in base.items():
        path = out / "baselines" / f"baseline-{kind}.gguf"
        assert cell["size_bytes"] == path.stat().st_size
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert types["blk.0.attn_q.weight"] == {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K"}.get(kind, kind)
        assert cell["runtime_tokens"] == ours["float"]["validation"]["metrics"]["tokens"]
    assert base["Q8_0"]["size_bytes"] > base["Q4_0"]["size_bytes"] > base["Q2_K"]["size_bytes"]
    # Q8_0 of the float model is nearly the float model in the same runtime, on the same tokens
    float_ppl = ours["float"]["validation"]["metrics"]["ppl_artifact"]
    assert base["Q8_0"]["runtime_ppl"] == pytest.approx(float_ppl, rel=0.05)
    assert base["Q2_K"]["runtime_ppl"] > base["Q8_0"]["runtime_ppl"]  # fewer bits, lossy: worse
    table = (out / "pareto.md").read_text()
    assert "runtime PTQ" in table and "| Q4_K_M |" in table
    assert (out / "pareto_size.png").stat().st_size > 1000


def test_executorch_baseline_is_measured_tabled_and_drawn(inputs, tmp_path):
    """--baselines with ExecuTorch: torchao's 8da4w .pte of the float model beside our float .pte, its perplexity in
    the ExecuTorch runtime on the same tokens, in pareto.json, the table and the plots."""
    pytest.importorskip("executorch")
    run = ParetoRun(_config(inputs, tmp_path, bits=["16"], formats=["executorch"], baselines=True, method="rtn"))
    cells = run.run()
    assert sorted(run.computed) == ["baseline-executorch-8da4w", "checkpoint-float", "float-executorch"]
    saved = json.loads((tmp_path / "pareto.json").read_text())["cells"]
    base = next(c for c in saved if c.get("baseline"))
    ours = next(c for c in cells if not c.get("baseline"))
    assert base["format"] == "executorch" and base["label"] == "8da4w"
    assert base["size_bytes"] == (tmp_path / "baselines" / "baseline-executorch-8da4w-seq65.pte").stat().st_size
    assert base["size_bytes"] < ours["size_bytes"] / 2  # int4 linears against the float .pte
    metrics = ours["validation"]["metrics"]
    assert base["runtime_tokens"] == metrics["tokens"]
    assert base["runtime_ppl"] == pytest.approx(metrics["ppl_artifact"], rel=0.05)  # 4-bit, close to float
    assert base["bench"]["tg_tps"]["median"] > 0
    table = (tmp_path / "pareto.md").read_text()
    assert "| 8da4w | runtime PTQ |" in table and "executorch" in table
    assert (tmp_path / "pareto_size.png").stat().st_size > 1000 and (tmp_path / "pareto_latency.png").is_file()


def test_baselines_need_validation(inputs, tmp_path):
    with pytest.raises(ParetoError, match="--no-validate"):
        _config(inputs, tmp_path, baselines=True, validate=False)


def test_given_checkpoint_is_swept_not_trained(first_run, inputs, tmp_path, monkeypatch):
    """--checkpoint BITS=DIR: a checkpoint trained elsewhere (a GPU) is exported, validated and benched here."""
    out, _, _ = first_run
    given = out / "checkpoints" / "2bit"
    monkeypatch.setattr(pipeline, "run_qat", lambda *a, **k: pytest.fail("a given checkpoint must not be trained"))
    run = ParetoRun(_config(inputs, tmp_path / "sweep", bits=["2"], checkpoints={"2": str(given)}))
    (cell,) = run.run()
    assert cell["checkpoint"]["checkpoint"] == str(given.resolve())
    assert cell["checkpoint"]["method"] == "qat" and cell["checkpoint"]["steps"] == 6  # from the checkpoint's recipe
    assert cell["validation"]["readback"] and not (tmp_path / "sweep" / "checkpoints").exists()
    header = (tmp_path / "sweep" / "pareto.md").read_text()
    assert "given checkpoints" in header and "2bit from 2bit" in header and "budget paper" not in header
    with pytest.raises(ParetoError, match="config.json missing"):
        _config(inputs, tmp_path / "x", checkpoints={"4": str(tmp_path)})
