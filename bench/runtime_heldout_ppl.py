"""Held-out perplexity of exported files in their own runtimes, on the held-out blocks the PyTorch figures use.

    python bench/runtime_heldout_ppl.py float.gguf ours-q4_0-qat.gguf baseline-Q4_0.gguf baseline-Q4_K_M.gguf \\
        --blocks 8 --block-size 512 --out bench/results/runtime_heldout_ppl.json

The blocks are qat.data's held-out split of the packaged text (documents never trained on), tokenized with the
default model's tokenizer unless --model names another; each block is scored from an empty context in the file's
runtime (llama.cpp, onnxruntime, ExecuTorch), and each file's ratio is given against the first file's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from formats.baselines import runtime_perplexity
from formats.registry import detect_artifact
from paretoq_export.canonical.atomic import write_text_atomic
from paretoq_export.model_source import load_model
from qat.data import DataConfig, build_heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="artifacts; ratios are against the first")
    ap.add_argument("--model", default=None, help="tokenizer source (default: the packaged SmolLM2-135M)")
    ap.add_argument("--data", nargs="+", default=["wikipedia"])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/runtime_heldout_ppl.json")
    args = ap.parse_args()
    tokenizer = load_model(args.model).tokenizer
    blocks = build_heldout(tokenizer, DataConfig(args.data, args.block_size))[: args.blocks].tolist()
    rows = []
    for path in args.files:
        started = time.time()
        ppl = runtime_perplexity(path, blocks, threads=args.threads)
        fmt, resolved = detect_artifact(path)
        first = rows[0]["runtime_ppl"] if rows else ppl
        rows.append({"file": str(path), "bytes": fmt.artifact_bytes(resolved), "runtime_ppl": ppl,
                     "ratio": ppl / first, "seconds": round(time.time() - started, 1)})
        print(f"{Path(path).name:<40} {rows[-1]['bytes'] / 2**20:8.1f} MiB  PPL {ppl:8.3f}  x{rows[-1]['ratio']:.4f}",
              flush=True)
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "data": args.data, "blocks": len(blocks),
                       "block_size": args.block_size, "tokens": len(blocks) * args.block_size}, "rows": rows}
    write_text_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
