"""`paretoq-export quantize`: round-to-nearest with the ParetoQ grids (the RTN baseline), then the checkpoint."""

from __future__ import annotations

import argparse

from paretoq_export.arguments import (
    add_checkpoint_arguments, add_model_arguments, add_quantization_arguments, qat_config,
)

HELP = "round-to-nearest with the ParetoQ grids (the RTN baseline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_quantization_arguments(parser)
    add_checkpoint_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from paretoq_export.pipeline import quantize_rtn
    from qat.targets import recorded_stored_bits

    path = quantize_rtn(args.model, qat_config(args), args.output, args.overwrite, args.float_dtype,
                        args.trust_remote_code)
    if recorded_stored_bits(path):
        print(recorded_stored_bits(path))
    print(f"wrote {path}")
    return 0
