"""Command-line front end of the ONNX exporter, mounted by paretoq_export/cli.py:

    paretoq-export --format onnx CHECKPOINT [-o DIR] [--accuracy-level {0,4}] [--seq2-bits {2,4}]
                   [--block-size 128] [--no-validate] [--threads 2] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from formats.gguf_cli import add_validation_arguments

ACCURACY_HELP = (
    "MatMulNBits accuracy_level. 0 (default): float32 activations, logits match the PyTorch reference to ~1e-6; "
    "3/4-bit layers run fast, 2-bit layers use a float zero point (float kernel). 4: onnxruntime quantizes "
    "activations to int8 in the integer-zero-point kernels (3/4-bit, ternary, binary): faster decoding, logits "
    "off by ~1e-2; 2-bit SEQ keeps its float zero point (float kernel) unless --seq2-bits 4"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="paretoq checkpoint directory (from `quantize`, `qat` or `import`)")
    parser.add_argument("-o", "--output", default=None,
                        help="output folder (default: <model>-ParetoQ-<bits>bit-onnx-acc<level> next to the "
                             "checkpoint)")
    parser.add_argument("--accuracy-level", type=int, default=0, choices=(0, 4), help=ACCURACY_HELP)
    parser.add_argument("--seq2-bits", type=int, default=2, choices=(2, 4),
                        help="2-bit SEQ container: 2 (bits=2, float zero point 1.5; smallest) or 4 (bits=4, codes "
                             "2q+5, step s/2: exact, twice the size, int8 kernels at --accuracy-level 4)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="largest MatMulNBits block size (power of two >= 16); per tensor the largest power of "
                             "two dividing the input width is used (576 -> 64)")
    parser.add_argument("--external-data", action="store_true",
                        help="store tensors in model.onnx.data (automatic above 2 GB)")
    add_validation_arguments(parser, "read-back exactness, onnxruntime vs PyTorch logits and cached generation",
                             "onnxruntime")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from formats.gguf_cli import validation_token_ids
    from formats.onnx import OnnxOptions, export_onnx
    from formats.onnx_validate import validate_onnx
    from paretoq_export.checkpoint import QuantizedCheckpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    ckpt = QuantizedCheckpoint.load(args.checkpoint)
    options = OnnxOptions(accuracy_level=args.accuracy_level, max_block_size=args.block_size,
                          seq2_bits=args.seq2_bits, overwrite=args.overwrite,
                          external_data=True if args.external_data else None)
    output = args.output
    if output is None:
        from formats.onnx import default_dirname

        output = Path(args.checkpoint).resolve().parent / default_dirname(ckpt, options)
    result = export_onnx(ckpt, output, options)
    print(f"wrote {result.path} ({result.nbytes / 2**20:.1f} MiB, accuracy_level {result.accuracy_level}, "
          f"{result.seconds:.1f} s)")
    print(f"{'container':<16} {'linears':>7} {'MiB':>8}")
    for kind, n in sorted(result.container_counts().items()):
        mib = sum(r.nbytes for r in result.records if r.container == kind) / 2**20
        print(f"{kind:<16} {n:>7} {mib:>8.2f}")
    print(f"{'float tensors':<16} {'':>7} {result.float_bytes / 2**20:>8.2f}")

    ids = validation_token_ids(ckpt, args)
    if ids is None:
        return 0
    report = validate_onnx(result.path, ckpt, ids, n_threads=args.threads)
    m, rb, gen = report["onnxruntime_vs_reference"], report["readback"], report["generation"]
    print(f"read-back: {rb['tensors']} tensors bit-exact ({rb['matmulnbits']} MatMulNBits decoded by onnxruntime)")
    print(f"onnxruntime vs PyTorch on {report['tokens']} tokens: max rel diff {m['max_rel_diff']:.1e}, mean KL "
          f"{m['mean_kl']:.2e}, top-1 {m['top1_agreement']:.1%} (clear margin {m['top1_agreement_clear_margin']:.1%}), "
          f"PPL {m['ppl_test']:.3f} vs {m['ppl_ref']:.3f} (ratio {m['ppl_ratio']:.4f})")
    print(f"generation: {gen['new_tokens']} greedy tokens with KV cache "
          f"{'equal' if gen['cached_equals_uncached'] else 'DIFFER from'} those without it")
    print(f"validation saved to {report['json']}")
    return 0
