"""bench/reproduce_paretoq.py's plot without zero-shot scores (--zeroshot-limit 0) and its recipe arguments."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "reproduce_paretoq.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reproduce_paretoq", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_paretoq"] = module
    spec.loader.exec_module(module)
    return module


def _results(zeroshot: bool) -> dict:
    rows = [{"method": "float", "bits": 16.0, "heldout_ppl": 14.0}]
    for method, ppl in (("rtn", 1e7), ("qat", 37.0), ("parq", 70.0)):
        for bits in (2.0, 4.0):
            row = {"method": method, "bits": bits, "heldout_ppl": ppl / bits, "steps": 10, "train_tokens": 100}
            if zeroshot:
                row["zeroshot_avg"], row["zeroshot_avg_norm"] = 0.4, 0.41
            rows.append(row)
    if zeroshot:
        rows[0]["zeroshot_avg"] = 0.45
    meta = {"quantized_params": 106_000_000, "model": "tiny", "tokens_low": 100, "tokens_high": 30,
            "device": "cpu", "zeroshot_chance": 0.35 if zeroshot else None}
    return {"meta": meta, "rows": rows}


@pytest.mark.parametrize("zeroshot", [False, True])
def test_plot_with_and_without_zero_shot(bench, tmp_path, zeroshot):
    png = bench.plot(_results(zeroshot), tmp_path / "r.png")
    assert png.is_file() and png.stat().st_size > 1000
    bench.print_table(_results(zeroshot))  # the table also prints rows without zero-shot scores
