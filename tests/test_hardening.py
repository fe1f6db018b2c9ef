"""Hardening, tried as an adversarial user would: no foreign code runs, nothing valid-looking is left behind, every
failure is one line, validation can fail. One section per item of the hardening issue, then the damage property
test, kill -9 mid-export, and the README's -o examples run verbatim."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paretoq_export.canonical.checkpoint import CheckpointError, QuantizedCheckpoint, saved_tokenizer_files
from paretoq_export.cli import main
from tiny_models import save_tiny_model_dir, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PARTIAL = re.compile(r"\.(partial|old)-")


def tiny_checkpoint():
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare

    return QATCheckpoint.from_qat_model(prepare(tiny_model("llama"), QATConfig(bits=2)), tiny_tokenizer(),
                                        recipe={"method": "rtn"})


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint().save(tmp_path_factory.mktemp("ck") / "ckpt")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, ckpt_dir) -> Path:
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    assert main(["--format", "gguf", str(ckpt_dir), "-o", str(out), "--no-validate"]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory, ckpt_dir) -> Path:
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "m"
    assert main(["--format", "onnx", str(ckpt_dir), "-o", str(out), "--no-validate", "--accuracy-level", "0"]) == 0
    return out


def run_cli(capsys, *argv) -> tuple[int, str, list[str]]:
    capsys.readouterr()  # what set-up printed (progress bars) is not the command's
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def assert_one_error(code: int, err: list[str], *needles: str) -> None:
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(ckpt: Path, edit) -> None:
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config = edit(config) or config
    path.write_text(json.dumps(config))


def litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if PARTIAL.search(p.name))


# ----------------------------------------------------------------------------- 1. code from a checkpoint runs
def add_tokenizer_code(folder: Path, marker: Path) -> None:
    """An auto_map in tokenizer_config.json and the tokenization_*.py it names, which leaves ``marker`` if run."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]},
                  tokenizer_class="EvilTokenizer")
    config_path.write_text(json.dumps(config))
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def test_model_tokenizer_code_needs_the_flag(tmp_path, capsys, monkeypatch):
    model = save_tiny_model_dir(tmp_path / "model")
    marker = tmp_path / "ran"
    add_tokenizer_code(model, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # a prompt would read this "y" and run the code
    code, _, err = run_cli(capsys, "quantize", "--model", model, "--bits", "2", "-o", tmp_path / "ck")
    assert_one_error(code, err, "tokenization_evil.py", "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "ck").exists()


def test_checkpoint_code_never_runs_and_is_never_copied(tmp_path, capsys, monkeypatch, ckpt_dir):
    pytest.importorskip("onnxruntime")
    plain = copy_checkpoint(ckpt_dir, tmp_path / "plain")
    (plain / "tokenization_extra.py").write_text("raise SystemExit('must never be imported')\n")
    ckpt = QuantizedCheckpoint.load(plain)
    assert not any(name.endswith(".py") for name in ckpt.tokenizer_files)
    assert ckpt.save(tmp_path / "resaved") and not list((tmp_path / "resaved").glob("*.py"))
    assert main(["--format", "onnx", str(plain), "-o", str(tmp_path / "onnx"), "--no-validate"]) == 0
    assert not list((tmp_path / "onnx").glob("*.py"))

    evil = copy_checkpoint(ckpt_dir, tmp_path / "evil")
    marker = tmp_path / "ran"
    add_tokenizer_code(evil, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    capsys.readouterr()
    for fmt in ("gguf", "onnx"):
        out = tmp_path / f"out-{fmt}"
        code, _, err = run_cli(capsys, "--format", fmt, evil, "-o", f"{out}/")
        assert_one_error(code, err, "tokenizer")
        assert not marker.exists() and not out.exists()


# ----------------------------------------------------------------------------- 2. valid-looking wrong files
def test_edited_config_is_refused_before_writing(tmp_path, capsys, ckpt_dir):
    ckpt = copy_checkpoint(ckpt_dir, tmp_path / "ck")
    edit_config(ckpt, lambda c: c.update(hidden_size=128))
    for fmt in ("gguf", "onnx"):
        code, _, err = run_cli(capsys, "--format", fmt, ckpt, "-o", tmp_path / f"out-{fmt}")
        assert_one_error(code, err, "config.json was edited", "--no-verify")
        assert not (tmp_path / f"out-{fmt}").exists()
    # unchecked, the disagreement between config and tensors is still one line before anything is written
    code, _, err = run_cli(capsys, "--format", "gguf", ckpt, "-o", tmp_path / "m.gguf", "--no-verify")
    assert_one_error(code, err, "config and weights disagree")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_checkpoint_without_integrity_data_needs_no_verify(tmp_path, capsys, ckpt_dir):
    ckpt = copy_checkpoint(ckpt_dir, tmp_path / "ck")
    def drop_hashes(config: dict) -> None:
        for key in ("weights_sha256", "config_sha256"):
            config["quantization_config"].pop(key)

    edit_config(ckpt, drop_hashes)
    with pytest.raises(CheckpointError, match="no integrity data.*--no-verify"):
        QuantizedCheckpoint.load(ckpt)
    assert QuantizedCheckpoint.load(ckpt, verify=False).quantized


def other_eps_checkpoint(ckpt_dir: Path, dst: Path) -> Path:
    """The same tensors saved under a config with another rms_norm_eps: a consistent checkpoint of another model."""
    ckpt = QuantizedCheckpoint.load(ckpt_dir)
    ckpt.config["rms_norm_eps"] = 0.5
    return ckpt.save(dst)


def test_validate_fails_on_a_wrong_model(tmp_path, capsys, ckpt_dir, gguf_file):
    other = other_eps_checkpoint(ckpt_dir, tmp_path / "other")
    report = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "validate", gguf_file, "--checkpoint", other, "--text", __file__,
                             "--validate-tokens", "96", "--json", report)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: validation failed:"), err
    verdict = json.loads(report.read_text())["verdict"]
    assert not verdict["passed"] and verdict["failures"] and "FAIL" in out
    code, _, err = run_cli(capsys, "validate", gguf_file, "--checkpoint", ckpt_dir, "--text", __file__,
                           "--validate-tokens", "96")
    assert code == 0 and err == [], err


def test_export_that_fails_validation_is_not_published(tmp_path, capsys, ckpt_dir):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    code, _, err = run_cli(capsys, "--format", "gguf", ckpt_dir, "-o", out, "--text", __file__, "--validate-tokens",
                           "96", "--min-top1", "1.01")
    assert code == 2 and len(err) == 1 and "validation failed" in err[0] and "nothing was written" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 3. cheap checks first
def test_output_that_cannot_be_written_fails_before_loading(tmp_path, capsys):
    model = save_tiny_model_dir(tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not weights: loading them would fail differently")
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "quantize", "--model", model, "--bits", "2", "-o", tmp_path / "afile" / "ck")
    assert_one_error(code, err, "is a file, not a folder")
    code, _, err = run_cli(capsys, "export", "gguf", tmp_path / "no-checkpoint", "-o", tmp_path / "afile" / "m.gguf")
    assert_one_error(code, err, "is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli(capsys, "quantize", "--model", model, "--bits", "2", "-o", locked / "ck")
        assert_one_error(code, err, "no write permission")


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "stablelm", "phimoe"])
def test_unsupported_architecture_refused_before_loading(tmp_path, capsys, model_type):
    from transformers import AutoConfig

    model = tmp_path / "model"
    model.mkdir()
    config = AutoConfig.for_model(model_type).to_dict()
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"never read")
    code, _, err = run_cli(capsys, "quantize", "--model", model, "--bits", "2", "-o", tmp_path / "ck")
    assert_one_error(code, err, "cannot be exported", "LlamaForCausalLM", "Qwen3ForCausalLM")
    assert "--target-modules" not in err[0] and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_phi3_longrope_is_refused_in_one_line(tmp_path, capsys, fmt):
    """Phi-3's 128k variants and Phi-4-mini (longrope: frequencies chosen by sequence length) are refused by the
    ONNX and ExecuTorch exporters in one line, before anything is written (GGUF writes them as llama.cpp does:
    tests/test_gguf.py); the 4k variants (no rope scaling) export everywhere."""
    pytest.importorskip({"onnx": "onnxruntime", "executorch": "executorch"}[fmt])
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare

    factors = [1.0 + i / 24 for i in range(24)]  # rotary dims / 2 (64 * 0.75 / 2)
    rope = {"rope_type": "longrope", "short_factor": factors, "long_factor": factors, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75}
    model = tiny_model("phi3", rope_scaling=rope, original_max_position_embeddings=128)
    ckpt_dir = QATCheckpoint.from_qat_model(prepare(model, QATConfig(bits=2)), tiny_tokenizer()).save(tmp_path / "ck")
    code, _, err = run_cli(capsys, "--format", fmt, ckpt_dir, "-o", f"{tmp_path}/out/", "--no-validate")
    assert_one_error(code, err, "rope type 'longrope' is not supported")
    assert not list((tmp_path / "out").glob("*"))


def test_unsupported_gguf_refused_from_its_metadata(tmp_path, capsys):
    """A .gguf input is judged by the architecture its metadata names, before transformers reads a tensor."""
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(64), writer.add_embedding_length(32), writer.add_feed_forward_length(64)
    writer.add_block_count(1), writer.add_head_count(2), writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2"), writer.add_token_list(["a", "b"]), writer.add_token_types([1, 1])
    writer.add_token_merges(["a b"]), writer.add_bos_token_id(0), writer.add_eos_token_id(1)
    writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    code, _, err = run_cli(capsys, "quantize", "--model", path, "--bits", "2", "-o", tmp_path / "ck")
    assert_one_error(code, err, "'gpt2' cannot be exported", "MistralForCausalLM", "Phi3ForCausalLM")
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- 4. one line, never a traceback
@pytest.mark.parametrize("damage, needle", [
    (lambda c: [c], "holds a list"),
    (lambda c: c["quantization_config"].pop("modules") and None, "lacks its modules table"),
    (lambda c: next(iter(c["quantization_config"]["modules"].values())).update(grid="seq9"), "unknown grid"),
    (lambda c: c["quantization_config"].update(modules=[1, 2]), "lacks its modules table"),
])
def test_malformed_config_is_one_line(tmp_path, capsys, ckpt_dir, damage, needle):
    ckpt = copy_checkpoint(ckpt_dir, tmp_path / "ck")
    edit_config(ckpt, damage)
    code, _, err = run_cli(capsys, "--format", "gguf", ckpt, "-o", tmp_path / "m.gguf", "--no-verify")
    assert_one_error(code, err, needle)


def test_damaged_artifacts_are_one_line(tmp_path, capsys, ckpt_dir, gguf_file, onnx_folder):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:40])  # inside the header
    code, _, err = run_cli(capsys, "validate", cut, "--checkpoint", ckpt_dir)
    assert_one_error(code, err, "cut.gguf")
    onnx = shutil.copytree(onnx_folder, tmp_path / "onnx")
    (onnx / "model.onnx").write_bytes((onnx / "model.onnx").read_bytes()[:5000])
    code, _, err = run_cli(capsys, "validate", onnx, "--checkpoint", ckpt_dir)
    assert_one_error(code, err, "damaged or truncated", "re-export")


def test_llama_cpp_refusing_a_file_is_one_line(tmp_path, capsys, ckpt_dir, gguf_file):
    """Tensors intact (read-back passes), architecture renamed: llama.cpp refuses it, and says why in our line."""
    data = gguf_file.read_bytes()
    at = data.index(b"llama", data.index(b"general.architecture"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + b"llamb" + data[at + 5:])
    code, _, err = run_cli(capsys, "validate", bad, "--checkpoint", ckpt_dir, "--validate-tokens", "48")
    assert_one_error(code, err, "llama.cpp could not load", "unknown model architecture", "re-export")


def test_executorch_int4_width_refused_before_lowering(tmp_path, capsys):
    pytest.importorskip("executorch")
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare

    model = prepare(tiny_model("llama", hidden=48, intermediate=96, layers=1), QATConfig(bits=2))
    ckpt_dir = QATCheckpoint.from_qat_model(model, tiny_tokenizer()).save(tmp_path / "ck")
    start = time.monotonic()
    code, _, err = run_cli(capsys, "--format", "executorch", ckpt_dir, "-o", f"{tmp_path}/out/")
    assert_one_error(code, err, "48 wide", "multiple of 32", "--target x86-int8")
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()  # lowering takes minutes


def test_refused_pickle_is_one_line(tmp_path, capsys):
    model = save_tiny_model_dir(tmp_path / "model")
    state = tiny_model("llama").state_dict()
    (model / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"state": state, "payload": Payload()}, fh)
    code, _, err = run_cli(capsys, "quantize", "--model", model, "--bits", "2", "-o", tmp_path / "ck")
    assert_one_error(code, err, "pytorch_model.bin")
    assert not marker.exists() and not (tmp_path / "ck").exists()


def test_no_import_noise_and_debug_shows_the_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "paretoq_export.cli", "export", "gguf", str(tmp_path / "none"), "-o",
            str(tmp_path / "m.gguf")]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'} is not a paretoq checkpoint (no config.json): make one with "
        "`paretoq-export quantize` or `paretoq-export qat`"], plain.stderr
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ----------------------------------------------------------------------------- 5. litter and surprises
def test_output_forms_are_the_same_for_every_format(tmp_path, capsys, ckpt_dir):
    pytest.importorskip("onnxruntime")
    for fmt, suffix in (("gguf", ".gguf"), ("onnx", "")):
        new_dir = tmp_path / f"new-{fmt}"
        assert main(["--format", fmt, str(ckpt_dir), "-o", f"{new_dir}/", "--no-validate"]) == 0
        (made,) = [p for p in new_dir.iterdir()]
        assert made.name.startswith("model-") and made.name.endswith(suffix) and made.name != new_dir.name
        again = main(["--format", fmt, str(ckpt_dir), "-o", str(new_dir), "--no-validate"])  # existing: same name
        assert again == 2 and "exists" in capsys.readouterr().err
        assert main(["--format", fmt, str(ckpt_dir), "-o", str(new_dir), "--no-validate", "--overwrite"]) == 0
        if not suffix:  # an ONNX folder given by its own name is the output, not a place for one
            assert main(["--format", fmt, str(ckpt_dir), "-o", str(made), "--no-validate"]) == 2
            assert "exists" in capsys.readouterr().err
        assert [p.name for p in new_dir.iterdir()] == [made.name] and litter(tmp_path) == []
    code, _, err = run_cli(capsys, "--format", "gguf", ckpt_dir, "-o", tmp_path / "m.bin", "--no-validate")
    assert_one_error(code, err, "does not end in .gguf")


def test_stale_partials_of_killed_runs_are_removed(tmp_path, capsys, ckpt_dir):
    pytest.importorskip("llama_cpp")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [f".m.gguf.partial-{dead}-abc", ".m.gguf.partial-x1y2", f".m.gguf.old-{dead}"]
    for name in stale[:2]:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / stale[2]).mkdir()
    live = tmp_path / f".m.gguf.partial-{os.getpid()}-zz"  # a running export's: kept
    live.write_bytes(b"in progress")
    assert main(["--format", "gguf", str(ckpt_dir), "-o", str(tmp_path / "m.gguf"), "--no-validate"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m.gguf"])
    # --overwrite over a file leaves no .old sibling either
    assert main(["--format", "gguf", str(ckpt_dir), "-o", str(tmp_path / "m.gguf"), "--no-validate",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m.gguf"])


def test_checkpoint_files_have_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = tiny_checkpoint().save(tmp_path / "ck")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert set(modes.values()) == {0o644}, modes


# ----------------------------------------------------------------------------- damage property test
def damaged(data: bytes, rng: random.Random, protect: int = 0) -> bytes:
    """Truncated at a random point, or 1-4 bytes flipped (after the first ``protect`` bytes)."""
    if rng.random() < 0.4:
        return data[: rng.randrange(0, len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(protect, len(out))
        out[i] ^= rng.randrange(1, 256)
    return bytes(out)


def test_damaged_files_exit_2_with_one_line(tmp_path, capsys, ckpt_dir, gguf_file, onnx_folder):
    """Random truncations and byte flips of checkpoints, GGUF files and ONNX folders: exit 2 with one error line,
    never a traceback and never an output at its final name; or, where the damage is harmless (a flipped byte of
    a doc string), a validation that passed on a file still bit-exact."""
    rng = random.Random(13)
    cases = ([("ckpt", name) for name in ("config.json", "model.safetensors") for _ in range(3)]
             + [("gguf", "m.gguf")] * 7 + [("onnx", "model.onnx")] * 5
             + [("onnx", "tokenizer.json"), ("onnx", "genai_config.json")])
    for i, (kind, name) in enumerate(cases):
        case = tmp_path / f"case{i}"
        case.mkdir()
        if kind == "ckpt":
            target = copy_checkpoint(ckpt_dir, case / "ck")
            (target / name).write_bytes(damaged((target / name).read_bytes(), rng))
            out = case / "m.gguf"
            code = main(["--format", "gguf", str(target), "-o", str(out)])
            assert not out.exists()
        else:
            target = (shutil.copy(gguf_file, case / name) if kind == "gguf"
                      else shutil.copytree(onnx_folder, case / "onnx"))
            file = Path(target) if kind == "gguf" else Path(target) / name
            file.write_bytes(damaged(file.read_bytes(), rng))
            report = case / "r.json"
            code = main(["validate", str(target), "--checkpoint", str(ckpt_dir), "--text", __file__,
                         "--validate-tokens", "48", "--json", str(report)])
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        if code == 0:  # only harmless damage may pass: every tensor still bit-exact, every threshold met
            result = json.loads(report.read_text())
            assert kind != "ckpt" and result["verdict"]["passed"], (kind, err)
            assert result["readback"]["exact"] == result["readback"]["checked"] > 0
        else:
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (kind, i, code, err)
            # a report appears only where the validation ran, and then it says it failed
            assert kind == "ckpt" or not report.exists() or not json.loads(report.read_text())["verdict"]["passed"]
        assert litter(case) == []


# ----------------------------------------------------------------------------- kill -9 mid-export
def complete_gguf(path: Path, ckpt_dir: Path) -> bool:
    from formats.gguf_readback import verify_gguf_readback

    return verify_gguf_readback(path, QuantizedCheckpoint.load(ckpt_dir))["exact"] > 0


def complete_onnx(path: Path, ckpt_dir: Path) -> bool:
    from formats.onnx_readback import verify_onnx_readback

    return bool(verify_onnx_readback(path, QuantizedCheckpoint.load(ckpt_dir)))


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_kill_9_leaves_absent_or_whole_and_the_next_run_cleans_up(tmp_path, ckpt_dir, fmt):
    pytest.importorskip("llama_cpp" if fmt == "gguf" else "onnxruntime")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    argv = [sys.executable, "-m", "paretoq_export.cli", "--format", fmt, str(ckpt_dir), "-o", str(out), "--text",
            __file__, "--validate-tokens", "48", "--overwrite"]
    complete = complete_gguf if fmt == "gguf" else complete_onnx
    # before any output exists (imports), then at several points after the staging folder appeared: exporting,
    # reading back, validating
    for after_partial in (None, 0.0, 1.0, 2.5):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if after_partial is None:
            time.sleep(1.0)
        else:
            deadline = time.monotonic() + 120
            while (not any(f"partial-{proc.pid}-" in name for name in litter(tmp_path)) and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            time.sleep(after_partial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() or complete(out, ckpt_dir), after_partial
        if after_partial == 0.0:
            assert any(f"partial-{proc.pid}-" in n for n in litter(tmp_path)), "the kill left no staging folder"
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0
    assert complete(out, ckpt_dir) and litter(tmp_path) == []


# ----------------------------------------------------------------------------- README examples, verbatim
def readme_commands(pattern: str) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "README.md").read_text().splitlines()]
    return [line for line in lines if line.startswith("paretoq-export") and re.search(pattern, line)]


@pytest.mark.parametrize("command", readme_commands(r"--format (gguf|onnx) ckpt-qat2 .*-o|export gguf ckpt-qat2 -o"))
def test_readme_output_examples_run_verbatim(tmp_path, monkeypatch, capsys, ckpt_dir, command):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpt_dir, tmp_path / "ckpt-qat2")
    argv = shlex.split(command)[1:]
    assert main(argv) == 0, capsys.readouterr().err
    output = Path(argv[argv.index("-o") + 1])
    assert output.exists() and litter(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands(r"--format executorch ckpt-qat2 -o out/$"))
def test_readme_executorch_example_runs_verbatim(tmp_path, monkeypatch, capsys, ckpt_dir, command):
    pytest.importorskip("executorch")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpt_dir, tmp_path / "ckpt-qat2")
    assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    assert len(list((tmp_path / "out").glob("*.pte"))) == 1 and (tmp_path / "out" / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------- the artifact's own tokenizer
def sentencepiece_tokenizer(folder: Path):
    """A Llama-2 / Mistral / MobileLLM style SentencePiece tokenizer (BPE, byte fallback) trained here on the
    packaged text, as transformers loads it; ``folder`` keeps its tokenizer.model."""
    import sentencepiece
    from transformers import AutoTokenizer

    from qat.data import load_documents

    text = "\n".join(load_documents(["wikipedia"]))[:200_000]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=SPM_VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1,
        # as Llama 2's tokenizer.model: no normalisation, whitespace kept, digits split
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


SPM_VOCAB = 512
UNICODE_TEXT = "Zürich – naïve café, 東京 and emoji 🙂; tabs\tand  double  spaces.\n" * 4


@pytest.mark.parametrize("fmt, ships", [
    ("gguf", "tokenizer.model"),
    ("gguf", "tokenizer.json only"),  # tokens, merge-rank scores and types from the tokenizer.json's BPE model
    ("onnx", "tokenizer.model"),
    ("onnx", "tokenizer.json only"),
    pytest.param("executorch", "tokenizer.model", marks=pytest.mark.slow),  # lowering: a minute each
    pytest.param("executorch", "tokenizer.json only", marks=pytest.mark.slow),
])
def test_sentencepiece_artifact_tokenizer_matches_transformers(tmp_path, capsys, ships, fmt):
    pytest.importorskip({"gguf": "llama_cpp", "onnx": "onnxruntime", "executorch": "executorch"}[fmt])
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare

    tokenizer = sentencepiece_tokenizer(tmp_path / "spm")
    model = prepare(tiny_model("llama", vocab_size=SPM_VOCAB), QATConfig(bits=2))
    ckpt = QATCheckpoint.from_qat_model(model, tokenizer, recipe={"method": "rtn"})
    assert "tokenizer.model" not in ckpt.tokenizer_files  # transformers 5 saves tokenizer.json alone
    if ships == "tokenizer.model":
        ckpt.tokenizer_files["tokenizer.model"] = (tmp_path / "spm" / "tokenizer.model").read_bytes()
    ckpt_dir = ckpt.save(tmp_path / "ck")
    text = tmp_path / "text.txt"
    text.write_text(UNICODE_TEXT + TEXT_SAMPLE)
    code, out, err = run_cli(capsys, "--format", fmt, ckpt_dir, "-o", f"{tmp_path}/out/", "--text", text,
                             "--validate-tokens", "96")
    assert code == 0, err
    (report,) = (tmp_path / "out").rglob("*validation.json")
    tok = json.loads(report.read_text())["tokenizer"]
    assert tok["equal"] and tok["tokens"] > 100, tok


TEXT_SAMPLE = "The history of the region is long and complex. Early settlements grew along the river. " * 5


def test_sentencepiece_json_without_space_prefix_in_gguf(tmp_path, capsys):
    """A SentencePiece BPE tokenizer.json that puts no U+2581 before the text (Gemma's: spaces replaced, nothing
    prepended) is written with tokenizer.ggml.add_space_prefix false, and llama.cpp tokenizes as transformers."""
    pytest.importorskip("llama_cpp")
    from transformers import PreTrainedTokenizerFast

    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare

    sentencepiece_tokenizer(tmp_path / "spm").save_pretrained(tmp_path / "saved")
    spec = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    spec["pre_tokenizer"] = None
    (tmp_path / "saved" / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "saved" / "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    assert tokenizer.tokenize("a b")[0] == "a"  # nothing prepended
    model = prepare(tiny_model("llama", vocab_size=SPM_VOCAB), QATConfig(bits=2))
    ckpt_dir = QATCheckpoint.from_qat_model(model, tokenizer, recipe={"method": "rtn"}).save(tmp_path / "ck")
    text = tmp_path / "text.txt"
    text.write_text(UNICODE_TEXT + TEXT_SAMPLE)
    code, _, err = run_cli(capsys, "--format", "gguf", ckpt_dir, "-o", tmp_path / "m.gguf", "--text", text,
                           "--validate-tokens", "96")
    assert code == 0, err
    report = json.loads((tmp_path / "m.gguf.validation.json").read_text())
    assert report["tokenizer"]["equal"] and report["tokenizer"]["tokens"] > 100, report["tokenizer"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx", pytest.param("executorch", marks=pytest.mark.slow)])
def test_mobilellm_style_on_grid_import_exports_end_to_end(tmp_path, capsys, fmt):
    """A MobileLLM-ParetoQ-style release: a Llama with shared embeddings, 2-bit weights already on the grid, and a
    SentencePiece tokenizer.model; `import --kind on-grid` then export, validated with the artifact's own
    tokenizer on text (the checkpoint holds the tokenizer.json transformers 5 writes)."""
    pytest.importorskip({"gguf": "llama_cpp", "onnx": "onnxruntime", "executorch": "executorch"}[fmt])
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare

    model_dir = tmp_path / "MobileLLM-ParetoQ-tiny-2-bit"
    rtn = QATCheckpoint.from_qat_model(prepare(tiny_model("llama", vocab_size=SPM_VOCAB), QATConfig(bits=2)))
    rtn.build_reference_model().save_pretrained(model_dir)  # float32 weights holding grid values
    sentencepiece_tokenizer(model_dir)
    code, _, err = run_cli(capsys, "import", "--kind", "on-grid", "--model", model_dir, "--bits", "2", "-o",
                           tmp_path / "ck")
    assert code == 0, err
    ckpt = QuantizedCheckpoint.load(tmp_path / "ck")
    assert ckpt.tied and {q.grid.name for q in ckpt.quantized.values()} == {"seq2"}
    for key, q in ckpt.quantized.items():  # the on-grid weights recovered exactly
        assert torch.equal(q.dequantize(), rtn.quantized[key].dequantize()), key
    text = tmp_path / "text.txt"
    text.write_text(UNICODE_TEXT + TEXT_SAMPLE)
    code, _, err = run_cli(capsys, "--format", fmt, tmp_path / "ck", "-o", f"{tmp_path}/out/", "--text", text,
                           "--validate-tokens", "96")
    assert code == 0, err
    (report,) = (tmp_path / "out").rglob("*validation.json")
    result = json.loads(report.read_text())
    assert result["tokenizer"]["equal"] and result["tokenizer"]["tokens"] > 100, result["tokenizer"]


def test_wrong_vocabulary_fails_validation_though_logits_agree(tmp_path, capsys, ckpt_dir, gguf_file):
    """Same weights, another byte-level BPE vocabulary in the checkpoint: the logits on ids agree exactly, only
    the tokenizer comparison sees that the GGUF would tokenize prompts differently."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT_SAMPLE[::-1]] * 20, vocab_size=320, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    other = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>")
    ckpt = QuantizedCheckpoint.load(ckpt_dir)
    ckpt.tokenizer_files = saved_tokenizer_files(other)
    other_dir = ckpt.save(tmp_path / "other")
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "validate", gguf_file, "--checkpoint", other_dir, "--text", __file__,
                           "--validate-tokens", "96", "--json", report)
    result = json.loads(report.read_text())
    assert code == 2 and "tokenizer gives other ids" in err[0], err
    assert result["metrics"]["kl_mean"] < 1e-4 and result["tokenizer"]["equal"] is False


def test_messages_name_flags_that_exist(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GPT2Config

    from qat.prepare import QATConfig, prepare

    model = save_tiny_model_dir(tmp_path / "model")
    code, _, err = run_cli(capsys, "import", "--kind", "paretoq-reference", "--model", model, "--bits", "2", "-o",
                           tmp_path / "ck")
    assert_one_error(code, err, "import --kind on-grid")
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supported are LlamaForCausalLM") as info:
        prepare(gpt2, QATConfig(bits=2))
    assert "--target-modules" not in str(info.value)


def test_a_linear_left_float_stops_the_run():
    from qat.prepare import QATConfig, prepare

    from paretoq_export.pipeline import refuse_float_linears

    model = prepare(tiny_model("llama"), QATConfig(bits=2))
    refuse_float_linears(model)  # every projection of a supported family is quantized
    model.model.layers[0].self_attn.qkv_proj = torch.nn.Linear(8, 24)  # a fused projection prepare does not know
    with pytest.raises(ValueError, match=r"1 linear layer\(s\) would stay float \(model.layers.0.self_attn.qkv_proj"):
        refuse_float_linears(model)
