"""`paretoq-export import`: a ParetoQ reference training checkpoint, or weights already on a grid, as the
canonical checkpoint."""

from __future__ import annotations

import argparse

from paretoq_export.arguments import add_checkpoint_arguments, add_model_arguments

HELP = "import a ParetoQ reference checkpoint or on-grid (bf16) weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", required=True, choices=("paretoq-reference", "on-grid"))
    add_model_arguments(parser, required=True)
    parser.add_argument("--bits", required=True, help="the run's bits (0 or 1.58: ternary), 1, 2, 3 or 4")
    add_checkpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from paretoq_export.pipeline import import_checkpoint

    path = import_checkpoint(args.kind, args.model, args.bits, args.output, args.overwrite, args.float_dtype,
                             args.trust_remote_code)
    print(f"wrote {path}")
    return 0
