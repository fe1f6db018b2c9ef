"""ExecuTorch acceptance matrix (not a test): bits {1, 1.58, 2, 3, 4} x tiny {Llama, Qwen2}, one .pte per cell.

    python bench/executorch_tiny_matrix.py [--out bench/results/executorch_tiny_matrix.json]

Each cell: a random 1-layer model (tests/tiny_models.py) rounded to the grid, exported with formats.executorch,
run in the ExecuTorch runtime against the PyTorch reference on 96 tokens: top-1 agreement (all positions and
clear-margin ones), PPL ratio, mean KL, KV-cached decode vs full recompute, and XNNPACK delegation (asserted: every
linear and its int8 activation quantization inside a delegate). The test suite covers the same grids with one
mixed-bit model per architecture (tests/test_executorch.py), because each lowering costs ~40 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["llama", "qwen2"])
    p.add_argument("--bits", nargs="+", default=["1", "1.58", "2", "3", "4"])
    p.add_argument("--out", default="bench/results/executorch_tiny_matrix.json")
    args = p.parse_args(argv)

    from formats.executorch import ExecuTorchOptions, export_executorch
    from formats.validation import validate_artifact
    from qat.checkpoint_io import QATCheckpoint
    from paretoq_export.canonical.grids import parse_bits
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model, tiny_tokenizer

    ids = np.random.default_rng(1).integers(3, 320, 96)
    rows = []
    with tempfile.TemporaryDirectory(prefix="et-matrix-") as tmp:
        for arch in args.archs:
            for bits in map(parse_bits, args.bits):
                model = prepare(tiny_model(arch, layers=1), QATConfig(bits=bits))
                ckpt = QATCheckpoint.from_qat_model(model, tiny_tokenizer(), recipe={"method": "rtn"})
                t0 = time.perf_counter()
                result = export_executorch(ckpt, Path(tmp) / f"{arch}-{bits}.pte",
                                           ExecuTorchOptions(max_seq_len=128, progress=False))
                export_s = time.perf_counter() - t0
                assert result.weights["exact"] == result.weights["tensors"] == 7, result.weights
                assert result.linears_delegated(), result.delegation.to_json()
                report = validate_artifact(result.path, ckpt, ids, progress=False, check_options={"kv_prefill": 40})
                m, kv = report["metrics"], report["checks"]["kv_cache"]
                row = {"arch": arch, "bits": bits, "bytes": result.nbytes, "export_s": round(export_s, 1),
                       "delegates": result.delegation.subgraphs, "linears_delegated": True,
                       "top1": m["top1"], "top1_clear_margin": m["top1_clear_margin"],
                       "ppl_ratio": m["ppl_ratio"], "mean_kl": m["kl_mean"],
                       "kv_max_abs_diff": kv["teacher_forced_max_abs_diff"], "kv_greedy_equal": kv["greedy_equal"]}
                rows.append(row)
                print(f"{arch:<6} {bits:>5} bits: top-1 {row['top1']:.3f} (clear margin {row['top1_clear_margin']:.3f})"
                      f", PPL ratio {row['ppl_ratio']:.5f}, KL {row['mean_kl']:.2e}, KV |diff| "
                      f"{row['kv_max_abs_diff']:.1e} greedy equal {row['kv_greedy_equal']}, {row['delegates']} "
                      f"delegates, export {export_s:.0f} s", flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"tokens": len(ids), "rows": rows}, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
