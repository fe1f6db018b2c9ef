"""Benchmark ONE exported file in this (fresh) process and print a JSON line: the parent
(paretoq_export.bench) starts one worker per artifact so that peak RSS and load time belong to that artifact alone.

    python -m paretoq_export.bench_worker PATH --format NAME [--threads 2] [--repeats 5] [--pp 128] [--tg 64]

Prints one JSON object on stdout: load_s, per-repeat pp/tg tokens/s, peak RSS (VmHWM) before and after loading.
A failure prints ``error: ...`` (one line) on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path



def _set_thread_env(threads: int) -> None:
    # before any runtime library is imported: OpenMP / MKL pools size themselves on first use
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def bench_one(path: str | os.PathLike, fmt: str, threads: int = 2, repeats: int = 5, pp: int = 128,
              tg: int = 64) -> dict:
    """Load ``path`` and time ``repeats`` prefill (pp tokens in one call) + decode (tg single-token steps) runs,
    with the format's runner opened for speed (no all-position logits, runtime-default KV types)."""
    from formats.registry import detect_artifact, format_named
    from runtime_tests.onnxruntime_runner import peak_rss_mib

    path = Path(path)
    fmt_object = format_named(fmt)
    runtime_path = detect_artifact(path)[1]
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    runner = fmt_object.open_runner(runtime_path, threads, pp + tg + 16, for_speed=True)
    load_s = time.perf_counter() - t0
    pp_tps: list[float] = []
    tg_tps: list[float] = []
    try:
        # one untimed full run first (page-in of mmapped weights, kernel selection, allocator growth), then one
        # repeat per call so every run's figure is kept (the runners report only medians)
        runner.bench(pp=pp, tg=tg, repeats=1, warmup=False)
        for _ in range(repeats):
            run = runner.bench(pp=pp, tg=tg, repeats=1, warmup=False)
            pp_tps.append(float(run["pp_tps"]))
            tg_tps.append(float(run["tg_tps"]))
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    return {"artifact": str(path), "format": fmt, "threads": threads, "repeats": repeats, "pp": pp, "tg": tg,
            "load_s": load_s, "pp_tps": pp_tps, "tg_tps": tg_tps, "peak_rss_mib": peak_rss_mib(),
            "rss_before_load_mib": rss_before, "pid": os.getpid()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path")
    from formats.registry import NAMES

    p.add_argument("--format", required=True, choices=NAMES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pp", type=int, default=128)
    p.add_argument("--tg", type=int, default=64)
    args = p.parse_args(argv)
    _set_thread_env(args.threads)
    try:
        result = bench_one(args.path, args.format, args.threads, args.repeats, args.pp, args.tg)
    except Exception as exc:  # noqa: BLE001 - the parent shows this one line next to the artifact's name
        print("error: " + " ".join(f"{type(exc).__name__}: {exc}".split()), file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
