"""Command-line front end of the ExecuTorch exporter, mounted by paretoq_export/cli.py:

    paretoq-export --format executorch CHECKPOINT [-o model.pte] [--target x86|arm64] [--max-seq-len 1024]
                   [--embedding-bits 4|8] [--no-validate] [--threads 2] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import sys

from formats.gguf_cli import add_validation_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="paretoq checkpoint directory (from `quantize`, `qat` or `import`)")
    parser.add_argument("-o", "--output", default=None,
                        help="output .pte file or directory (default: a name from the model and bits next to the "
                             "checkpoint); the tokenizer file is written beside it")
    parser.add_argument("--target", default="x86", choices=("x86", "x86-int8", "arm64"),
                        help="x86 (default): every grid's codes exactly in int4, XNNPACK 8da4w kernels, runs on any "
                             "CPU; XNNPACK stores int4 per-row scales as bf16 (<= 2^-9 relative). x86-int8: the same "
                             "integers in int8 with fp32 scales (8da8w): bit-exact, twice the linear bytes. arm64: true 1-3 bit weights for torchao's lowbit kernels -- the export needs an Arm64 "
                             "torchao and the .pte runs only on Arm64 ExecuTorch builds with those kernels")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV cache length, prompt + generated tokens (default 1024, capped at the model's "
                             "max_position_embeddings)")
    parser.add_argument("--embedding-bits", type=int, default=None, choices=(4, 8),
                        help="store the token embedding table with 4 or 8-bit per-row steps (lossy; default float32)")
    add_validation_arguments(parser, "ExecuTorch vs PyTorch logits and KV-cached decode", "ExecuTorch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    from formats.executorch import ExecuTorchOptions, export_executorch, validate_executorch
    from formats.gguf_cli import validation_token_ids
    from paretoq_export.checkpoint import QuantizedCheckpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    ckpt = QuantizedCheckpoint.load(args.checkpoint)
    options = ExecuTorchOptions(target=args.target, max_seq_len=args.max_seq_len, embedding_bits=args.embedding_bits,
                                overwrite=args.overwrite, progress=None)
    output = args.output
    if output is None:
        from pathlib import Path

        output = Path(args.checkpoint).resolve().parent
    result = export_executorch(ckpt, output, options)
    d = result.delegation
    print(f"wrote {result.path} ({result.nbytes / 2**20:.1f} MiB, target {result.target}, max_seq_len "
          f"{result.max_seq_len}, {result.seconds:.0f} s)")
    if result.tokenizer_path:
        print(f"tokenizer: {result.tokenizer_path}")
    print(f"weights: {result.weights['exact']}/{result.weights['tensors']} quantized tensors equal the checkpoint; "
          f"XNNPACK: {d.subgraphs} delegates, linears delegated: {'all' if result.linears_delegated() else 'NOT all'}")

    if args.target == "arm64":
        if args.validate:
            print("validation skipped: an arm64 .pte runs only on Arm64 ExecuTorch builds", file=sys.stderr)
        return 0
    args.validate_tokens = min(args.validate_tokens, result.max_seq_len - 1)  # the whole text must fit the cache
    ids = validation_token_ids(ckpt, args)
    if ids is None:
        return 0
    report = validate_executorch(result.path, ckpt, ids, threads=args.threads)
    m, kv = report["executorch_vs_reference"], report["kv_cache"]
    print(f"ExecuTorch vs PyTorch on {report['tokens']} tokens: mean KL {m['mean_kl']:.2e}, top-1 "
          f"{m['top1_agreement']:.1%} (clear margin {m['top1_agreement_clear_margin']:.1%}), PPL {m['ppl_test']:.3f} "
          f"vs {m['ppl_ref']:.3f} (ratio {m['ppl_ratio']:.4f})")
    line = (f"KV cache: decode vs full recompute max |diff| {kv['teacher_forced_max_abs_diff']:.2e}, greedy tokens "
            f"{'equal' if kv['greedy_equal'] else 'differ'}")
    if "decode_vs_reference" in kv:
        d, p = kv["decode_vs_reference"], kv["prefill_vs_reference"]
        line += (f"; vs PyTorch on the {kv['teacher_forced_positions']} decoded positions: decode KL {d['mean_kl']:.2e} "
                 f"PPL ratio {d['ppl_ratio']:.4f}, prefill KL {p['mean_kl']:.2e} PPL ratio {p['ppl_ratio']:.4f}")
    print(line)
    print(f"validation saved to {report['json']}")
    return 0
