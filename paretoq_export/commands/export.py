"""`paretoq-export export FORMAT CHECKPOINT [-o OUT]`: write a runtime file from a checkpoint, then (by default
below 1B parameters) validate it in its runtime with the one validation every command runs (formats.validation);
the report lands beside the file (``<file>.validation.json``; inside an ONNX folder ``validation.json``).

Every format in formats.registry is a subcommand with its own options; ``--format FORMAT`` is the shortcut
(``paretoq-export --format gguf CKPT`` is ``paretoq-export export gguf CKPT``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from formats.registry import FORMATS, format_named
from paretoq_export.arguments import add_output_arguments, add_validation_text_arguments

HELP = f"write a runtime file from a checkpoint: {' | '.join(FORMATS)} (or --format NAME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for fmt in FORMATS.values():
        help_text = f"{fmt.title} for {fmt.runtime}"
        p = formats.add_parser(fmt.name, help=help_text, description=help_text)
        p.add_argument("checkpoint", help="paretoq checkpoint directory (from `quantize`, `qat` or `import`)")
        add_output_arguments(p, "output file or folder (default: a name from the model and bits next to the "
                                "checkpoint)", required=False)
        fmt.add_arguments(p)
        p.add_argument("--validate", dest="validate", action="store_true", default=None,
                       help=f"check {fmt.validation_checks} (default: on below 1B params)")
        p.add_argument("--no-validate", dest="validate", action="store_false")
        add_validation_text_arguments(p, f"{fmt.runtime} threads for validation")


def shortcut(argv: list[str]) -> list[str]:
    """``[export] ... --format NAME ...`` -> ``export NAME ...`` (the --format shortcut, anywhere in the line)."""
    rest = argv[1:] if argv[:1] == ["export"] else argv
    for i, tok in enumerate(rest):
        if tok == "--format" and i + 1 < len(rest):
            return ["export", rest[i + 1], *rest[:i], *rest[i + 2:]]
        if tok.startswith("--format="):
            return ["export", tok.split("=", 1)[1], *rest[:i], *rest[i + 1:]]
    return argv


def run(args: argparse.Namespace) -> int:
    from formats.validation import report_path, validate_artifact, write_report
    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from paretoq_export.validation_text import ValidationTextError, validate_by_default, validation_token_ids

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    fmt = format_named(args.format)
    ckpt = QuantizedCheckpoint.load(args.checkpoint)
    options = fmt.options_from_args(args)
    output = args.output or fmt.default_output(Path(args.checkpoint), ckpt, options)
    artifact = fmt.export(ckpt, output, options)
    print("\n".join(artifact.summary))

    if not (args.validate if args.validate is not None else validate_by_default(ckpt)):
        return 0
    if artifact.cannot_run_here:
        print(f"validation skipped: {artifact.cannot_run_here}", file=sys.stderr)
        return 0
    try:
        ids = validation_token_ids(ckpt, args.text, fmt.validation_tokens(artifact, args.validate_tokens))
    except ValidationTextError as exc:
        print(f"validation skipped: {exc}", file=sys.stderr)
        return 0
    report = validate_artifact(artifact.path, ckpt, ids, threads=args.threads, progress=False)
    report["checkpoint"] = str(args.checkpoint)
    print(summary(report))
    print(f"validation saved to {write_report(report, report_path(artifact.path))}")
    return 0


def summary(report: dict) -> str:
    """The validation report in a few lines (the `validate` command prints the full table)."""
    rb, m = report["readback"], report["metrics"]
    lines = [f"read-back: {rb['exact']}/{rb['checked']} tensors bit-exact"
             + (f", not exact: {len(rb['mismatches'])}" if rb["mismatches"] else ""),
             f"{report['runtime']['runtime']} vs PyTorch on {m['tokens']} tokens: mean KL {m['kl_mean']:.2e}, top-1 "
             f"{m['top1']:.1%} (clear margin {m['top1_clear_margin']:.1%}), PPL {m['ppl_artifact']:.3f} vs "
             f"{m['ppl_reference']:.3f} (ratio {m['ppl_ratio']:.4f})"]
    generation = report["checks"].get("generation")
    if generation:
        lines.append(f"generation: {generation['new_tokens']} greedy tokens with KV cache "
                     f"{'equal' if generation['cached_equals_uncached'] else 'DIFFER from'} those without it")
    kv = report["checks"].get("kv_cache")
    if kv:
        line = (f"KV cache: decode vs full recompute max |diff| {kv['teacher_forced_max_abs_diff']:.2e}, greedy "
                f"tokens {'equal' if kv['greedy_equal'] else 'differ'}")
        if "decode_vs_reference" in kv:
            d, p = kv["decode_vs_reference"], kv["prefill_vs_reference"]
            line += (f"; vs PyTorch on the {kv['teacher_forced_positions']} decoded positions: decode KL "
                     f"{d['mean_kl']:.2e} PPL ratio {d['ppl_ratio']:.4f}, prefill KL {p['mean_kl']:.2e} PPL ratio "
                     f"{p['ppl_ratio']:.4f}")
        lines.append(line)
    return "\n".join(lines)
