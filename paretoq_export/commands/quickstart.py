"""`paretoq-export quickstart`: SmolLM2-135M, short QAT in llama.cpp's Q4_0 layout -> checkpoint -> GGUF -> llama.cpp,
next to the F16 file and llama.cpp's own Q4_0, in one go."""

from __future__ import annotations

import argparse

HELP = "SmolLM2-135M: short QAT in the Q4_0 layout -> GGUF -> llama.cpp, next to F16 and llama.cpp's Q4_0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", default=None, help="1, 1.58, 2, 3 or 4 (default 4)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="one step per this many weights (default 32: llama.cpp's Q4_0 blocks); 0: per row")
    parser.add_argument("--steps", type=int, default=None, help="QAT steps (default 30, ~10 min in all on 2 cores)")
    parser.add_argument("--recipe", default=None, choices=("default", "paper"), help="QAT recipe (default: default)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-5: the recipe's GPU-batch lr is too high for 4 x 128-token steps)")
    parser.add_argument("-o", "--output-dir", default=None,
                        help="where checkpoint, GGUF files and quickstart.json go (default quickstart-out)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default 2)")


def run(args: argparse.Namespace) -> int:
    from paretoq_export.quickstart import run_quickstart

    chosen = {k: getattr(args, k) for k in ("bits", "group_size", "steps", "recipe", "lr", "output_dir", "threads")}
    overrides = {k: v for k, v in chosen.items() if v is not None}
    if overrides.get("group_size") == 0:  # per row, the paper's setting
        overrides["group_size"] = None
    return run_quickstart(**overrides)
