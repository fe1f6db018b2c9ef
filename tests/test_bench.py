"""`paretoq-export bench`: tiny GGUF / ONNX files benchmarked side by side in real runtimes (one process each),
the --json schema, ratios, the bandwidth bound, llama.cpp's own quantizer as a baseline, one-line errors."""

from __future__ import annotations

import json

import gguf
import pytest

from formats.registry import format_named
from formats.baselines import llama_quantize
from formats.protocol import ArtifactError
from paretoq_export.bench import bench_artifacts, detect_format
from paretoq_export.cli import main
from runtime_tests.bandwidth import measure_read_bandwidth

pytest.importorskip("llama_cpp")

SPEED = dict(threads=2, repeats=2, pp=16, tg=8)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A 2-bit GGUF, an F16 GGUF of the float model, a 2-bit ONNX folder (tied tiny Llama), an untied 2-bit GGUF."""
    from formats.gguf import GGUFOptions, export_gguf
    from formats.onnx import OnnxOptions, export_onnx
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("bench")
    tok = tiny_tokenizer()
    q2 = QATCheckpoint.from_qat_model(prepare(tiny_model(), QATConfig(bits=2)), tok)
    fp = QATCheckpoint.from_float_model(tiny_model(), tok)
    untied = QATCheckpoint.from_qat_model(prepare(tiny_model(tie_word_embeddings=False), QATConfig(bits=2)), tok)
    out = {
        "q2": export_gguf(q2, d / "q2.gguf", GGUFOptions(progress=False)).path,
        "f16": export_gguf(fp, d / "f16.gguf", GGUFOptions(tensor_types=[".*=F16"], allow_lossy=True,
                                                           progress=False)).path,
        "untied": export_gguf(untied, d / "untied.gguf", GGUFOptions(progress=False)).path,
    }
    try:
        out["onnx"] = export_onnx(q2, d / "q2-onnx", OnnxOptions(progress=False)).path
    except ImportError:
        pass
    return out


def test_side_by_side_schema_and_ratios(artifacts):
    paths = [artifacts["f16"], artifacts["q2"]] + ([artifacts["onnx"]] if "onnx" in artifacts else [])
    report = bench_artifacts(paths, progress=False, **SPEED)
    assert set(report) >= {"machine", "threads", "repeats", "pp", "tg", "results"}
    assert report["machine"]["cores"] >= 1 and report["machine"]["bandwidth_gbs"] > 0.5 and report["machine"]["cpu"]
    assert (report["threads"], report["repeats"], report["pp"], report["tg"]) == (2, 2, 16, 8)
    results = report["results"]
    assert [r["format"] for r in results] == ["gguf", "gguf"] + (["onnx"] if len(paths) == 3 else [])
    first = results[0]
    for r, path in zip(results, paths):
        assert r["artifact"] == str(path)
        for key in ("pp_tps", "tg_tps"):
            s = r[key]
            assert 0 < s["min"] <= s["median"] <= s["max"]
        assert len(r["pp_runs"]) == len(r["tg_runs"]) == 2
        assert r["load_s"] > 0 and r["peak_rss_mib"] > r["rss_before_load_mib"] > 0
        assert r["bytes_per_token"] == r["weight_bytes_per_token"] + r["kv_bytes_per_token"] > 0
        assert r["bound_tg_tps"] == pytest.approx(report["machine"]["bandwidth_gbs"] * 1e9 / r["bytes_per_token"])
        assert r["fraction_of_bound"] == pytest.approx(r["tg_tps"]["median"] / r["bound_tg_tps"])
        assert r["pp_ratio"] == pytest.approx(r["pp_tps"]["median"] / first["pp_tps"]["median"])
        assert r["tg_ratio"] == pytest.approx(r["tg_tps"]["median"] / first["tg_tps"]["median"])
    assert first["pp_ratio"] == first["tg_ratio"] == 1.0
    f16, q2 = results[0], results[1]
    assert f16["size_bytes"] == artifacts["f16"].stat().st_size
    # the 2-bit file reads far fewer bytes per token, so its bandwidth bound is higher
    assert q2["bytes_per_token"] < f16["bytes_per_token"] / 2 and q2["bound_tg_tps"] > 2 * f16["bound_tg_tps"]


def test_bytes_per_token_counts_embedding_as_row_unless_tied(artifacts):
    context = 24.0
    tied = format_named("gguf").decode_bytes(artifacts["q2"], context)
    untied = format_named("gguf").decode_bytes(artifacts["untied"], context)
    reader = gguf.GGUFReader(str(artifacts["untied"]))
    table = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    tied_size = artifacts["q2"].stat().st_size
    # tied: the table is the output layer, read in full every token -> weights ~ the whole file
    assert 0.9 * tied_size < tied.weights <= tied_size
    # untied: the input table is gathered one row per token
    assert untied.weights < artifacts["untied"].stat().st_size - 0.9 * table
    # KV cache grows linearly with the context (2 layers x 2 KV heads x 64 dims x K and V, F16)
    assert tied.kv_cache == 2 * 2 * 2 * 64 * context * 2
    assert format_named("gguf").decode_bytes(artifacts["q2"], 2 * context).kv_cache == 2 * tied.kv_cache
    if "onnx" in artifacts:
        onnx_bytes = format_named("onnx").decode_bytes(artifacts["onnx"], context)
        # onnxruntime folds the fp16 table's Cast at load: the tied output layer reads it as float32 (the untied
        # file's table has the same 320 x 256 fp16 shape)
        assert onnx_bytes.weights > 2 * table
        assert onnx_bytes.kv_cache == 2 * tied.kv_cache  # float32 KV cache


def test_baselines_f16_and_llama_cpp_q4_0(artifacts, tmp_path, capsys):
    """--baselines: an F16 GGUF of the float model (our exporter) and llama.cpp's own Q4_0 of it, benched first."""
    from tiny_models import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "tiny-llama")
    out = tmp_path / "bench.json"
    argv = ["bench", "--baselines", "F16,Q4_0", "--model", str(model), "--baselines-dir", str(tmp_path / "base"),
            str(artifacts["q2"]), "--repeats", "1", "--pp", "16", "--tg", "8", "--json", str(out)]
    assert main(argv) == 0
    f16, q4 = tmp_path / "base" / "baseline-F16.gguf", tmp_path / "base" / "baseline-Q4_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q4)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(f16)).tensors}["blk.0.attn_q.weight"] == "F16"
    report = json.loads(out.read_text())
    assert [r["artifact"] for r in report["results"]] == [str(f16), str(q4), str(artifacts["q2"])]
    assert report["results"][1]["size_ratio"] < 0.5 and report["results"][2]["size_ratio"] < 0.3
    assert "baseline-Q4_0.gguf" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="no file type 'Q9_9'"):
        llama_quantize(f16, tmp_path / "x.gguf", "Q9_9")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_table_and_json(artifacts, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(artifacts["q2"]), str(artifacts["f16"]), "--repeats", "1", "--pp", "16", "--tg", "8",
            "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "q2.gguf" in text and "f16.gguf" in text and "GB/s" in text
    report = json.loads(out.read_text())
    assert [r["artifact"] for r in report["results"]] == [str(artifacts["q2"]), str(artifacts["f16"])]


def test_errors_are_one_line(artifacts, tmp_path, capsys):
    def error(argv):
        assert main(["bench", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "not found" in error([str(tmp_path / "missing.gguf")])
    (tmp_path / "folder").mkdir()
    assert "genai_config.json" in error([str(tmp_path / "folder")])
    (tmp_path / "notes.txt").write_text("x")
    assert "not a benchmarkable artifact" in error([str(tmp_path / "notes.txt")])
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    line = error([str(artifacts["q2"]), str(broken), "--repeats", "1", "--pp", "8", "--tg", "4"])
    assert "broken.gguf" in line and "failed" in line
    assert "--repeats must be >= 1" in error([str(artifacts["q2"]), "--repeats", "0"])
    assert detect_format(artifacts["q2"]).name == "gguf"


def test_bandwidth_probe_positive():
    assert 0.5 < measure_read_bandwidth(1, buffer_bytes=64 * 2**20, passes=2) < 2000
