"""The CLI end to end on tiny models: RTN, QAT, import, eval, and one-line errors that leave nothing behind."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from paretoq_export import cli
from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
from paretoq_export.canonical.grids import grid_for_bits
from paretoq_export.cli import main
from qat.quantizers import init_alpha
from tiny_models import TINY_TEXT, save_tiny_model_dir, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "corpus.txt"
    # many short documents so a held-out split by document exists
    path.write_text("\n\n".join(f"Document {i}. {TINY_TEXT}" for i in range(60)))
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_quantize_writes_checkpoint(model_dir, tmp_path):
    out = tmp_path / "ck"
    assert main(["quantize", "--model", str(model_dir), "--bits", "ternary", "--override", "down_proj=4", "-o", str(out)]) == 0
    ckpt = QuantizedCheckpoint.load(out)
    bits = ckpt.bits_per_module()
    assert bits["model.layers.0.self_attn.q_proj"] == 1.58 and bits["model.layers.1.mlp.down_proj"] == 4
    assert ckpt.recipe["method"] == "rtn"
    assert ckpt.load_tokenizer()("the fox").input_ids  # tokenizer travelled with the checkpoint


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--bits", "5"], "unsupported bits '5'"),
        (["--bits", "2", "--embedding-bits", "2"], "unsupported embedding bits"),
        (["--bits", "2", "--override", "down_proj"], "NAME=BITS"),
    ],
)
def test_bad_bits_are_one_line_errors(model_dir, tmp_path, capsys, argv_tail, message):
    out = tmp_path / "ck"
    assert main(["quantize", "--model", str(model_dir), "-o", str(out), *argv_tail]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_unknown_architecture(tmp_path, capsys):
    bad = tmp_path / "weird"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "definitely-not-a-model"}))
    assert main(["quantize", "--model", str(bad), "--bits", "2", "-o", str(tmp_path / "o")]) == 2
    assert "unknown architecture 'definitely-not-a-model'" in _error_line(capsys)


def test_remote_code_needs_flag(tmp_path, capsys):
    bad = tmp_path / "remote"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "custom-x", "auto_map": {"AutoConfig": "x.Cfg"}}))
    assert main(["quantize", "--model", str(bad), "--bits", "2", "-o", str(tmp_path / "o")]) == 2
    assert "--trust-remote-code" in _error_line(capsys)


def test_non_empty_output_refused_before_work(model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["quantize", "--model", str(model_dir), "--bits", "2", "-o", str(out)]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert (out / "precious.txt").read_text() == "keep me"


def test_qat_missing_data(model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["qat", "--model", str(model_dir), "--bits", "2", "--data", str(tmp_path / "nope.txt"),
               "--steps", "2", "-o", str(out)])
    assert rc == 2
    assert "nope.txt" in _error_line(capsys)
    assert not out.exists()


def test_qat_end_to_end_and_eval(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ck"
    rc = main(["qat", "--model", str(model_dir), "--bits", "2", "--data", str(text_file), "--steps", "4",
               "--batch-size", "2", "--block-size", "32", "--lr", "1e-3", "-o", str(out)])
    assert rc == 0
    ckpt = QuantizedCheckpoint.load(out)
    assert ckpt.recipe["method"] == "qat" and ckpt.recipe["train"]["steps"] == 4
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(text_file), "--block-size", "32", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert 1.0 < result["heldout_ppl"] < 1e6


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_qat_and_export_of_another_family(arch, text_file, tmp_path, capsys):
    """qat from a model directory of each added family: every linear trained quantized (Phi-3's fused qkv_proj and
    gate_up_proj included, per row), then a validated GGUF export."""
    pytest.importorskip("llama_cpp")
    model_dir = save_tiny_model_dir(tmp_path / f"tiny-{arch}", arch, hidden=64, intermediate=128)
    out = tmp_path / "ck"
    rc = main(["qat", "--model", str(model_dir), "--bits", "2", "--data", str(text_file), "--steps", "4",
               "--batch-size", "2", "--block-size", "32", "--lr", "1e-3", "-o", str(out)])
    assert rc == 0
    ckpt = QuantizedCheckpoint.load(out)
    layer = {k.split(".layers.0.")[1] for k in ckpt.quantized if ".layers.0." in k}
    fused = arch == "phi3"
    assert layer == ({"self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                      "mlp.down_proj.weight"} if fused else
                     {f"{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")})
    assert ckpt.quantized["model.layers.0.mlp.down_proj.weight"].scale.shape == (64,)  # one step per row
    capsys.readouterr()
    export = ["--format", "gguf", str(out), "-o", str(tmp_path / "m.gguf"), "--text", str(text_file),
              "--validate-tokens", "64"]
    if arch == "phi3":
        # the name (from the folder, tiny-phi3) makes llama.cpp apply its Phi-3 token workaround, which needs
        # tokens this byte-level vocabulary lacks: refused in one line, and another --name exports
        assert main(export) == 2
        assert "looks up its tokens <unk>, <|endoftext|>" in _error_line(capsys) and not (tmp_path / "m.gguf").exists()
        export += ["--name", "tiny fused model"]
    assert main(export) == 0, capsys.readouterr().err


def test_eval_corrupt_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["quantize", "--model", str(model_dir), "--bits", "2", "-o", str(out)]) == 0
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["eval", str(out), "--data", "x.txt"]) == 2
    assert "corrupt" in _error_line(capsys)


def _reference_run_dir(path, bits, pickled=False):
    """What a ParetoQ reference run leaves: Llama config + latent weights + weight_clip_val per linear."""
    model = tiny_model("llama", tie_word_embeddings=False)
    grid = grid_for_bits(bits)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("proj.weight")]:
        state[key + "_clip_val"] = init_alpha(state[key], grid)
    path.mkdir()
    model.config.save_pretrained(path)
    if pickled:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, path / "model.safetensors")
    return path


def test_import_reference_checkpoint(tmp_path):
    run = _reference_run_dir(tmp_path / "run", 0)
    assert main(["import", "--kind", "paretoq-reference", "--model", str(run), "--bits", "0", "-o", str(tmp_path / "ck")]) == 0
    ckpt = QuantizedCheckpoint.load(tmp_path / "ck")
    assert set(ckpt.bits_per_module().values()) == {1.58} and len(ckpt.quantized) == 14
    run_bin = _reference_run_dir(tmp_path / "run_bin", 2, pickled=True)
    assert main(["import", "--kind", "paretoq-reference", "--model", str(run_bin), "--bits", "2", "-o", str(tmp_path / "ck2")]) == 0


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_import_refuses_unsafe_pickle(tmp_path, capsys):
    run = tmp_path / "evil"
    run.mkdir()
    tiny_model("llama").config.save_pretrained(run)
    with open(run / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    rc = main(["import", "--kind", "paretoq-reference", "--model", str(run), "--bits", "2", "-o", str(tmp_path / "ck")])
    assert rc == 2
    assert "weights_only" in _error_line(capsys)
    assert not (tmp_path / "ck").exists()


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "paretoq_export.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "qat" in proc.stdout


def _commands() -> list[list[str]]:
    from formats.registry import NAMES

    return [[name] for name in cli.COMMANDS] + [["export", fmt] for fmt in NAMES]


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: paretoq-export {' '.join(command)}")


def test_format_shortcut_is_the_export_subcommand():
    from paretoq_export.commands.export import shortcut

    assert shortcut(["--format", "onnx", "ck", "-o", "x"]) == ["export", "onnx", "ck", "-o", "x"]
    assert shortcut(["export", "ck", "--format=gguf"]) == ["export", "gguf", "ck"]
    assert shortcut(["export", "executorch", "ck"]) == ["export", "executorch", "ck"]
