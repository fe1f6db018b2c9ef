"""`paretoq-export eval`: held-out perplexity of a checkpoint's PyTorch reference."""

from __future__ import annotations

import argparse
import json

from paretoq_export.arguments import add_data_arguments, data_config
from paretoq_export.validate import add_verify_argument

HELP = "held-out perplexity of a checkpoint's PyTorch reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint")
    add_data_arguments(parser, required=False)
    parser.add_argument("--max-blocks", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the result here")
    add_verify_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from paretoq_export.canonical.atomic import check_output, write_text_atomic
    from paretoq_export.canonical.checkpoint import CheckpointError, QuantizedCheckpoint
    from paretoq_export.pipeline import heldout_perplexity
    from qat.data import build_heldout

    if args.json:
        check_output(args.json, overwrite=True)  # an unwritable result fails before the evaluation runs
    ckpt = QuantizedCheckpoint.load(args.checkpoint, verify=args.verify)
    tokenizer = ckpt.load_tokenizer()
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint} has no tokenizer files: re-create it with a tokenizer")
    heldout = build_heldout(tokenizer, data_config(args))  # never samples teacher data
    reference = ckpt.build_reference_model().to("cuda" if torch.cuda.is_available() else "cpu")
    ppl = heldout_perplexity(reference, heldout, args.max_blocks)
    result = {"checkpoint": str(args.checkpoint), "heldout_ppl": ppl, "blocks": min(len(heldout), args.max_blocks),
              "block_size": args.block_size, "data": args.data}
    print(json.dumps(result, indent=2))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0
