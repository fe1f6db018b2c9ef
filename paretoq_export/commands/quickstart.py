"""`paretoq-export quickstart`: SmolLM2-135M, short 2-bit QAT -> checkpoint -> GGUF -> llama.cpp, in one go."""

from __future__ import annotations

import argparse

HELP = "SmolLM2-135M: short 2-bit QAT -> checkpoint -> GGUF -> llama.cpp"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", default=None, help="1, 1.58, 2, 3 or 4 (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="QAT steps (default 60, ~10 min on 2 cores)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default 3e-4: best of a sweep at this budget)")
    parser.add_argument("-o", "--output-dir", default=None,
                        help="where checkpoint, GGUF files and quickstart.json go (default quickstart-out)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default 2)")


def run(args: argparse.Namespace) -> int:
    from paretoq_export.quickstart import run_quickstart

    chosen = {k: getattr(args, k) for k in ("bits", "steps", "lr", "output_dir", "threads")}
    return run_quickstart(**{k: v for k, v in chosen.items() if v is not None})
