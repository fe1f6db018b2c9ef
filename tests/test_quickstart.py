"""The quickstart pipeline end to end on a tiny model and a small text file (the real one runs SmolLM2-135M)."""

import json

from paretoq_export.quickstart import QuickstartConfig, run_quickstart
from tiny_models import TINY_TEXT, save_tiny_model_dir


def test_quickstart_tiny_end_to_end(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "tiny-llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}. {TINY_TEXT * 2}" for i in range(80)))
    out = tmp_path / "out"
    config = QuickstartConfig(model=str(model_dir), data=(str(corpus),), steps=4, block_size=32, eval_blocks=4,
                              validate_tokens=96, generate_tokens=4, prompt="The quick brown", output_dir=out)
    assert run_quickstart(config) == 0

    summary = json.loads((out / "quickstart.json").read_text())
    readback = summary["validation"]["readback"]
    assert readback["exact"] == readback["checked"] > 0 and not readback["mismatches"]
    metrics = summary["validation"]["metrics"]
    assert metrics["tokens"] == 96
    assert metrics["kl_mean"] < 1e-3 and abs(metrics["ppl_ratio"] - 1) < 0.01
    assert summary["train"]["steps"] == 4
    # the default: llama.cpp's Q4_0 layout (4-bit per 32 linears, Q8_0 table), the same bytes as its own Q4_0
    quantized_types = {t: n for t, n in summary["gguf_types"].items() if t != "F32"}  # norms stay F32
    assert quantized_types == {"Q4_0": 14, "Q8_0": 1}, summary["gguf_types"]
    assert summary["gguf_bytes"] < summary["f16_bytes"] / 2
    assert abs(summary["gguf_bytes"] - summary["llamacpp_q4_0_bytes"]) < 0.05 * summary["gguf_bytes"]
    ppl = summary["runtime_ppl"]
    assert set(ppl) == {"F16 (float)", "llama.cpp Q4_0", "ParetoQ 4-bit per 32"} and min(ppl.values()) > 1
    assert summary["train"]["recipe"]["name"] == "default"
    assert summary["rtn_ppl"] > 0 and summary["qat_ppl"] > 0 and summary["float_ppl"] > 0
    assert (out / "quickstart-4bit.gguf").is_file() and (out / "quickstart-F16.gguf").is_file()
    assert (out / "quickstart-llamacpp-Q4_0.gguf").is_file()
    printed = capsys.readouterr().out
    assert "F16 (float)" in printed and "llama.cpp Q4_0" in printed and "greedy: 'The quick brown" in printed
