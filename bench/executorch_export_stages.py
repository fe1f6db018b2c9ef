"""Where an ExecuTorch export spends its time (not a test): wall and CPU seconds of each stage of one export.

    python bench/executorch_export_stages.py CHECKPOINT [--max-seq-len 1024] [--no-shortcuts]
                                             [--out bench/results/executorch_export_stages.json]

Wraps the stage functions of formats.executorch and of executorch's own lowering (the edge conversion: ATen
decompositions and edge-dialect passes; partitioning and XNNPACK's per-delegate preprocess; to_executorch) with
timers, runs ``export_executorch`` once and prints the table with the load average and the .pte's sha256 (the
shortcuts must not change a byte). ``--no-shortcuts`` lowers the way executorch does on its own (no pass skipping,
no shape rules, three decompositions). CPU seconds are the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="canonical checkpoint folder (e.g. `paretoq-export quantize --bits 2 -o ck2`)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--embedding-bits", type=int, default=None, choices=(4, 8))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-shortcuts", action="store_true", help="executorch's own lowering path, for comparison")
    p.add_argument("--out", default="bench/results/executorch_export_stages.json")
    args = p.parse_args(argv)

    import torch
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.exir.program import _program

    import formats.executorch as writer
    import formats.executorch_program as program

    torch.set_num_threads(args.threads)
    stages: dict[str, dict] = {}

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                s = stages.setdefault(label, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
                s["wall_s"] += time.perf_counter() - t
                s["cpu_s"] += time.process_time() - c
                s["calls"] += 1

        setattr(owner, name, wrapper)

    timed(writer, "build_eager_model", "quantized weights (build_eager_model)")
    timed(writer, "verify_eager_weights", "weights == checkpoint (verify_eager_weights)")
    timed(writer, "export_program", "torch.export")
    timed(_program, "_gen_edge_manager_for_partitioners", "to_edge: decompositions + edge passes")
    timed(torch.export.ExportedProgram, "run_decompositions", "  run_decompositions")
    timed(_program, "_generate_edge_program", "  edge-dialect passes")
    timed(_program.EdgeProgramManager, "to_backend", "partition + XNNPACK lowering")
    timed(xnnpack_preprocess.XnnpackBackend, "preprocess", "  XNNPACK preprocess (per delegate)")
    timed(_program.EdgeProgramManager, "to_executorch", "to_executorch (memory planning, emit)")
    timed(writer, "write_bytes_atomic", "write")
    if args.no_shortcuts:
        writer.lower_to_executorch = functools.partial(program.lower_to_executorch, shortcuts=False)
        export = writer.export_program  # the timed wrapper
        writer.export_program = lambda model, max_seq_len: export(model, max_seq_len, shortcuts=False)

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="export_stages-") as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        result = writer.export_executorch(args.checkpoint, Path(tmp) / "m.pte", writer.ExecuTorchOptions(
            max_seq_len=args.max_seq_len, embedding_bits=args.embedding_bits, progress=False))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        sha = hashlib.sha256(result.path.read_bytes()).hexdigest()
    load_after = os.getloadavg()[0]
    print(f"{args.checkpoint}: {result.nbytes:,} bytes, {result.delegation.subgraphs} delegates, sha256 {sha[:16]}; "
          f"shortcuts {'off' if args.no_shortcuts else 'on'}; load average {load:.2f} before, {load_after:.2f} after")
    print(f"{'stage':<48} {'wall s':>8} {'CPU s':>8} {'calls':>6}")
    for label, s in stages.items():
        print(f"{label:<48} {s['wall_s']:>8.1f} {s['cpu_s']:>8.1f} {s['calls']:>6}")
    print(f"{'export_executorch':<48} {wall:>8.1f} {cpu:>8.1f}")
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "max_seq_len": args.max_seq_len,
                               "shortcuts": not args.no_shortcuts, "bytes": result.nbytes, "sha256": sha,
                               "delegates": result.delegation.subgraphs, "wall_s": wall, "cpu_s": cpu,
                               "load_average_before": load, "load_average_after": load_after, "stages": stages},
                              indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
