"""bench/qat_recipe_ablation.py end to end on a tiny model (CPU): the GPU runs use the same code path."""

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import save_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, model_dir: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "qat_recipe_ablation.py"), "--model", str(model_dir),
                    "--data", "wikipedia", "--steps", "3", "--batch-size", "2", "--block-size", "32",
                    "--eval-blocks", "2", "--no-float", "--save-dir", str(tmp_path / name), "--out", str(out),
                    *extra], check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.read_text())


def test_deterministic_runs_save_identical_checkpoints_and_group_variants_train(tmp_path):
    model_dir = tmp_path / "tiny"
    save_tiny_model_dir(model_dir)
    variants = ["--variant", "d2:recipe=default,bits=2", "--variant", "q4g32:recipe=default,bits=4,group=32,lr=1e-4"]
    first = _run(tmp_path, model_dir, "a", "--deterministic", *variants)
    second = _run(tmp_path, model_dir, "b", "--deterministic", *variants)
    assert first["meta"]["deterministic"] is True
    for a, b in zip(first["rows"], second["rows"], strict=True):
        assert len(a["checkpoint_sha256"]) == 64
        assert a["checkpoint_sha256"] == b["checkpoint_sha256"], a["name"]
        assert a["heldout_ppl"] == b["heldout_ppl"]
    rows = {r["name"]: r for r in first["rows"]}
    assert rows["q4g32"]["group"] == 32 and rows["q4g32"]["lr"] == 1e-4
    assert rows["d2"]["checkpoint_sha256"] != rows["q4g32"]["checkpoint_sha256"]
