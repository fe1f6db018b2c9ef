"""`paretoq-export validate`: tiny 2-bit GGUF and ONNX exports pass through the CLI, a byte flipped inside one
tensor's data fails naming that tensor, unknown formats are refused with one line."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from formats.registry import detect_artifact
from paretoq_export import cli
from paretoq_export import validate as V

SCHEMA = {"format", "artifact", "artifact_bytes", "checkpoint", "readback", "metrics", "zeroshot", "seconds"}
METRICS = {"tokens", "kl_mean", "top1", "ppl_reference", "ppl_artifact", "ppl_ratio"}


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(bits: float = 2):
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model, tiny_tokenizer

    model = prepare(tiny_model("llama"), QATConfig(bits=bits))
    return QATCheckpoint.from_qat_model(model, tiny_tokenizer(), recipe={"method": "rtn", "test": True})


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tiny_checkpoint().save(tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from formats.gguf import export_gguf

    return export_gguf(tiny_checkpoint(), tmp_path_factory.mktemp("gguf") / "m.gguf").path


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from formats.onnx import OnnxOptions, export_onnx

    return export_onnx(tiny_checkpoint(), tmp_path_factory.mktemp("onnx") / "m", OnnxOptions(progress=False, accuracy_level=0, smallest=True)).path


def _validate(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["validate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _check_report(report: dict, fmt: str) -> None:
    assert SCHEMA <= set(report) and METRICS <= set(report["metrics"]) and report["format"] == fmt
    rb, m = report["readback"], report["metrics"]
    assert rb["checked"] > 14 and rb["exact"] == rb["checked"] and rb["mismatches"] == []  # 14 linears + floats
    assert m["tokens"] == 96
    assert m["kl_mean"] < 1e-4 and abs(m["ppl_ratio"] - 1) < 0.01
    assert m["ppl_artifact"] == pytest.approx(m["ppl_reference"] * m["ppl_ratio"], rel=1e-9)
    assert report["artifact_bytes"] > 100_000 and report["seconds"] > 0


# ------------------------------------------------------------------------------------------------ passing
def test_gguf_validates(tmp_path, capsys, ckpt_dir, gguf_file):
    code, out, err = _validate(capsys, gguf_file, "--checkpoint", ckpt_dir, "--text", __file__,
                               "--max-tokens", 96, "--json", tmp_path / "r.json", "--threads", 1)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    _check_report(report, "gguf")
    assert report["artifact_bytes"] == gguf_file.stat().st_size and report["zeroshot"] is None
    assert report["metrics"]["top1"] >= 0.9  # llama.cpp quantizes activations: near-ties may flip
    assert f"{report['readback']['exact']}/{report['readback']['checked']} tensors bit-exact" in out
    assert "mean KL" in out and "PPL artifact" in out


def test_onnx_validates_with_zero_shot(tmp_path, capsys, ckpt_dir, onnx_folder):
    from runtime_tests import zeroshot

    try:
        zeroshot.task_data_dir()
    except zeroshot.ZeroShotDataError as exc:
        pytest.skip(str(exc))
    code, out, err = _validate(capsys, onnx_folder, "--checkpoint", ckpt_dir, "--text", __file__,
                               "--max-tokens", 96, "--json", tmp_path / "r.json", "--tasks", "arc_easy", "obqa",
                               "--limit", 3, "--threads", 1, "--plot", tmp_path / "zs.png")
    assert code == 0, err
    assert (tmp_path / "zs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "r.json").read_text())
    _check_report(report, "onnx")
    assert report["metrics"]["top1"] == 1.0 and report["metrics"]["kl_mean"] < 1e-9  # float activations
    zs = report["zeroshot"]
    assert set(zs) == {"reference", "artifact"} and set(zs["reference"]) == {"arc_easy", "obqa", "average"}
    assert zs["reference"]["arc_easy"]["n"] == 3 and zs["reference"] == zs["artifact"]
    assert "zero-shot acc" in out and "arc_easy" in out
    # a path to model.onnx itself is the same artifact
    fmt, path = detect_artifact(onnx_folder / "model.onnx")
    assert (fmt.name, path) == ("onnx", onnx_folder)


# ------------------------------------------------------------------------------------------------ corrupted
def _flip(path, offset: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_gguf_fails_naming_the_tensor(tmp_path, capsys, ckpt_dir, gguf_file):
    import gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gguf_file.read_bytes())
    tensor = next(t for t in gguf.GGUFReader(str(bad)).tensors if t.name == "blk.1.ffn_up.weight")
    _flip(bad, int(tensor.data_offset) + int(tensor.n_bytes) // 2)
    code, out, err = _validate(capsys, bad, "--checkpoint", ckpt_dir, "--text", __file__, "--max-tokens", 96)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: read-back of ") and "blk.1.ffn_up.weight" in err, err
    assert "re-export" in err


def test_corrupted_onnx_fails_naming_the_tensor(tmp_path, capsys, ckpt_dir, onnx_folder):
    import shutil

    import onnx
    from onnx import numpy_helper

    bad = tmp_path / "bad"
    shutil.copytree(onnx_folder, bad)
    model = onnx.load(bad / "model.onnx")
    init = next(i for i in model.graph.initializer if i.name == "model.layers.1.mlp.up_proj.qweight")
    raw = numpy_helper.to_array(init).tobytes()
    data = (bad / "model.onnx").read_bytes()
    assert data.count(raw) == 1  # the packed codes sit in the file once: flip bytes inside them
    _flip(bad / "model.onnx", data.index(raw) + len(raw) // 2)
    code, out, err = _validate(capsys, bad, "--checkpoint", ckpt_dir, "--text", __file__, "--max-tokens", 96)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: read-back of ") and "model.layers.1.mlp.up_proj" in err, err


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_formats_are_refused(tmp_path, capsys, ckpt_dir):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = _validate(capsys, tmp_path / "notes.txt", "--checkpoint", ckpt_dir)
    assert code == 2 and err.startswith("error: cannot tell the format of") and ".gguf" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _validate(capsys, tmp_path / "empty", "--checkpoint", ckpt_dir)
    assert code == 2 and "folder without model.onnx" in err
    (tmp_path / "half.pte").write_bytes(b"\0" * 64)
    code, _, err = _validate(capsys, tmp_path / "half.pte", "--checkpoint", ckpt_dir)
    assert code == 2 and "not its magic bytes" in err and "re-export" in err
    code, _, err = _validate(capsys, tmp_path / "missing.gguf", "--checkpoint", ckpt_dir)
    assert code == 2 and "missing.gguf not found" in err
    assert err.count("\n") == 1


def test_unknown_task_missing_checkpoint_and_text(tmp_path, capsys, ckpt_dir, gguf_file):
    code, _, err = _validate(capsys, gguf_file, "--checkpoint", tmp_path, "--tasks", "mmlu")
    assert code == 2 and "unknown zero-shot task 'mmlu'" in err
    code, _, err = _validate(capsys, gguf_file, "--checkpoint", tmp_path)
    assert code == 2 and "is not a paretoq checkpoint" in err
    code, _, err = _validate(capsys, gguf_file, "--checkpoint", ckpt_dir, "--plot", tmp_path / "p.png")
    assert code == 2 and "--plot" in err and "--tasks" in err
    code, _, err = _validate(capsys, gguf_file, "--checkpoint", ckpt_dir, "--text", tmp_path / "nope.txt")
    assert code == 2 and "--text" in err and "nope.txt not found" in err


def test_detect_format_by_magic(tmp_path, gguf_file):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(gguf_file.read_bytes())
    fmt, path = detect_artifact(renamed)
    assert (fmt.name, path) == ("gguf", renamed)
    assert np.isclose(fmt.artifact_bytes(renamed), gguf_file.stat().st_size)


# ------------------------------------------------------------------------------------------------ ExecuTorch
@pytest.mark.slow  # the tiny .pte export (torch.export + XNNPACK lowering) takes about a minute of CPU
def test_executorch_validates_and_corruption_is_named(tmp_path, capsys, ckpt_dir):
    pytest.importorskip("executorch")
    from formats.executorch import ExecuTorchOptions, export_executorch
    from formats.executorch_readback import xnnpack_weight_bytes
    from formats.executorch_weights import intx_weight

    pte = export_executorch(tiny_checkpoint(), tmp_path / "m.pte",
                            ExecuTorchOptions(max_seq_len=128, progress=False)).path
    code, out, err = _validate(capsys, pte, "--checkpoint", ckpt_dir, "--text", __file__, "--max-tokens", 96,
                               "--json", tmp_path / "r.json", "--threads", 1)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    rb, m = report["readback"], report["metrics"]
    assert report["format"] == "executorch" and m["tokens"] == 96 and m["kl_mean"] < 1e-4
    assert rb["checked"] == 15 and rb["exact"] + len(rb["mismatches"]) == 15  # 14 linears + float lm_head
    assert "content hash" in rb["note"]
    # flip one byte inside the packed codes of one linear: named through its content hash
    q = tiny_checkpoint().quantized["model.layers.1.mlp.up_proj.weight"]
    packed = xnnpack_weight_bytes(intx_weight(q.codes, q.scale, q.grid).qdata.numpy(), 4)
    data = pte.read_bytes()
    assert data.count(packed) == 1
    bad = tmp_path / "bad.pte"
    bad.write_bytes(data)
    _flip(bad, data.index(packed) + len(packed) // 2, n=1)
    code, out, err = _validate(capsys, bad, "--checkpoint", ckpt_dir, "--text", __file__, "--max-tokens", 96)
    assert code == 2 and err.count("\n") == 1 and "model.layers.1.mlp.up_proj.weight" in err, err


def test_verdict_thresholds_per_format_and_overrides():
    from formats.validation import judge, thresholds_for

    assert thresholds_for("executorch").max_kl > thresholds_for("gguf").max_kl  # int8 activations
    assert thresholds_for("gguf", min_top1=0.5).min_top1 == 0.5
    good = {"metrics": {"kl_mean": 1e-6, "top1_clear_margin": 1.0, "top1": 0.99, "ppl_ratio": 1.0001}, "checks": {}}
    assert judge(good, thresholds_for("gguf"))["passed"]
    # a wrong rms_norm_eps: top-1 2.35% is what the issue saw pass with exit 0
    bad = {"metrics": {"kl_mean": 3.1, "top1_clear_margin": None, "top1": 0.0235, "ppl_ratio": 0.7}, "checks": {},
           "tokenizer": {"equal": False, "acceptable": False, "agreement": 0.1, "first_difference": "token 3"}}
    verdict = judge(bad, thresholds_for("gguf"))
    assert not verdict["passed"] and len(verdict["failures"]) == 4, verdict
    assert any("top-1 agreement 2.35%" in f for f in verdict["failures"])
    assert judge({**good, "metrics": {**good["metrics"], "ppl_ratio": 1 / 1.03}}, thresholds_for("gguf"))[
        "failures"] == ["PPL ratio 0.9709 outside 1/1.02..1.02"]


def test_failed_onnx_verdict_at_int8_activations_suggests_the_exact_level():
    from formats.validation import judge, thresholds_for, verdict_line

    bad = {"metrics": {"kl_mean": 0.4, "top1_clear_margin": 0.7, "top1": 0.6, "ppl_ratio": 1.2}, "checks": {}}
    at_level = {level: {**bad, "format": "onnx", "runtime": {"runtime": "onnxruntime", "accuracy_level": level}}
                for level in (0, 4)}
    for report in at_level.values():
        report["verdict"] = judge(report, thresholds_for("onnx"))
    assert "--accuracy-level 0" in verdict_line(at_level[4])
    assert "--accuracy-level" not in verdict_line(at_level[0])  # already exact: the hint would mislead
