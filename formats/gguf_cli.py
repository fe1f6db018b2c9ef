"""Command-line front end of the GGUF exporter, mounted by paretoq_export/cli.py:

    paretoq-export --format gguf CHECKPOINT [-o model.gguf] [--ternary-type TQ1_0] [--embedding-type Q8_0]
                   [--tensor-type 'attn_v=Q8_0'] [--allow-lossy] [--no-validate] [--threads 2] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

VALIDATE_MAX_PARAMS = 1_000_000_000  # --validate defaults on below this size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="paretoq checkpoint directory (from `quantize`, `qat` or `import`)")
    parser.add_argument("-o", "--output", default=None,
                        help="output .gguf file or directory (default: GGUF-convention name next to the checkpoint)")
    parser.add_argument("--ternary-type", default="TQ2_0", choices=("TQ1_0", "TQ2_0"),
                        help="container for ternary and binary weights: TQ2_0 (default, faster) or TQ1_0 (smaller)")
    parser.add_argument("--embedding-type", default=None,
                        help="token embedding type: F16 (default), F32, Q8_0, Q4_0 ... (float tables: rounded)")
    parser.add_argument("--output-type", default=None,
                        help="output (lm_head) type for untied models: F16 (default), F32, Q8_0, Q4_0 ...")
    parser.add_argument("--tensor-type", action="append", default=[], metavar="NAME_REGEX=TYPE",
                        help="per-tensor type as llama-quantize takes it (e.g. 'attn_v=Q8_0'); refused unless exact "
                             "or --allow-lossy; repeatable")
    parser.add_argument("--allow-lossy", action="store_true",
                        help="accept --tensor-type overrides that cannot hold the grid exactly")
    add_validation_arguments(parser, "read-back exactness and llama.cpp vs PyTorch logits", "llama.cpp")
    parser.add_argument("--name", default=None, help="general.name (default from the base model)")
    parser.add_argument("--base-model", default=None, help="hub id of the base model for general.base_model.*")
    parser.add_argument("--license", default=None, help="general.license (default: known for the base model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


_FALLBACK_TEXT = (
    "The history of the region is long and complex. Early settlements grew along the river, where fertile soil "
    "supported farming and trade. Over the centuries, small villages became towns, and towns became cities with "
    "markets, schools and churches. In the nineteenth century the arrival of the railway changed the economy, "
    "bringing new industries and workers from across the country. Today the area is known for its universities, "
    "its museums and its parks, and millions of visitors come every year to see its old buildings and gardens. "
)


def add_validation_arguments(parser: argparse.ArgumentParser, checks: str, runtime: str) -> None:
    """--validate / --no-validate / --threads / --text / --validate-tokens, the same for every exporter's CLI
    (read by validation_token_ids)."""
    parser.add_argument("--validate", dest="validate", action="store_true", default=None,
                        help=f"check {checks} (default: on below 1B params)")
    parser.add_argument("--no-validate", dest="validate", action="store_false")
    parser.add_argument("--threads", type=int, default=2, help=f"{runtime} threads for validation")
    parser.add_argument("--text", default=None,
                        help="text file for validation (default: the held-out Wikipedia documents, else a built-in "
                             "paragraph)")
    parser.add_argument("--validate-tokens", type=int, default=512, help="tokens of --text to evaluate")


def validation_text(path: str | None = None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8")
    try:
        from qat.data import load_documents, split_documents

        # the documents `qat --data wikipedia` holds out (default fraction and seed): never trained on
        _, heldout = split_documents(load_documents(["wikipedia"]), 0.05, 0)
        return "\n\n".join(heldout)
    except Exception:  # noqa: BLE001 - packaged text optional here; fall back to a fixed paragraph
        return _FALLBACK_TEXT * 8


def validation_token_ids(ckpt, args: argparse.Namespace) -> list[int] | None:
    """Held-out token ids to validate an export with (--validate / --text / --validate-tokens, shared by every
    exporter's CLI), or None when validation is off (default: on below VALIDATE_MAX_PARAMS) or impossible."""
    n_params = sum(int(q.codes.numel()) for q in ckpt.quantized.values()) + sum(
        int(t.numel()) for t in ckpt.tensors.values())
    if not (args.validate if args.validate is not None else n_params < VALIDATE_MAX_PARAMS):
        return None
    tokenizer = ckpt.load_tokenizer()
    if tokenizer is None:
        print("validation skipped: the checkpoint has no tokenizer", file=sys.stderr)
        return None
    return tokenizer(validation_text(args.text))["input_ids"][: args.validate_tokens]


def run(args: argparse.Namespace) -> int:
    from formats.gguf import GGUFOptions, export_gguf, validate_gguf

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from paretoq_export.checkpoint import QuantizedCheckpoint

    ckpt = QuantizedCheckpoint.load(args.checkpoint)
    options = GGUFOptions(
        ternary_type=args.ternary_type, embedding_type=args.embedding_type, output_type=args.output_type,
        tensor_types=args.tensor_type, allow_lossy=args.allow_lossy, overwrite=args.overwrite,
        name=args.name, base_model=args.base_model, license=args.license, progress=None,
    )
    output = args.output
    if output is None:
        output = Path(args.checkpoint).resolve().parent
    result = export_gguf(ckpt, output, options)
    print(f"wrote {result.path} ({result.nbytes / 2**20:.1f} MiB, {result.file_type}, {result.seconds:.1f} s)")
    print(f"{'type':<8} {'tensors':>7} {'MiB':>8}")
    for t, n in sorted(result.type_counts().items()):
        mib = sum(r.nbytes for r in result.records if r.ggml_type == t) / 2**20
        print(f"{t:<8} {n:>7} {mib:>8.2f}")
    if result.fallbacks:
        print(f"{len(result.fallbacks)} tensors use an exact fallback container (see paretoq.fallbacks), e.g. "
              f"{result.fallbacks[0]}")
    if result.lossy:
        print(f"lossy tensors: {', '.join(result.lossy[:5])}{' ...' if len(result.lossy) > 5 else ''}")

    ids = validation_token_ids(ckpt, args)
    if ids is None:
        return 0
    report = validate_gguf(result.path, ckpt, ids, n_threads=args.threads)
    m = report["llamacpp_vs_reference"]
    rb = report["readback"]
    print(f"read-back: {rb['exact']}/{rb['tensors']} tensors bit-exact"
          + (f", lossy: {len(rb['lossy'])}" if rb["lossy"] else ""))
    print(f"llama.cpp vs PyTorch on {report['tokens']} tokens: mean KL {m['mean_kl']:.2e}, top-1 "
          f"{m['top1_agreement']:.1%} (clear margin {m['top1_agreement_clear_margin']:.1%}), PPL {m['ppl_test']:.3f} "
          f"vs {m['ppl_ref']:.3f} (ratio {m['ppl_ratio']:.4f})")
    print(f"validation saved to {report['json']}")
    return 0
