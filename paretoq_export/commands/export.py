"""`paretoq-export export FORMAT CHECKPOINT [-o OUT]`: write a runtime file from a checkpoint, then (by default
below 1B parameters) validate it in its runtime with the one validation every command runs (formats.validation);
the report lands beside the file (``<file>.validation.json``; inside an ONNX folder ``validation.json``).

``-o`` means the same for every format: an existing folder (other than an ONNX folder itself), or a path ending
in ``/``, gets the format's default name inside it; any other path is the output itself. The export is written,
read back and (where on) validated in a hidden staging folder beside the output (``.<name>.partial-<pid>-XXXX``)
and moved to its final name only when all of that passed, so a file at the final name is always whole and checked;
a run killed midway leaves only the staging folder, which the next run removes.

Every format in formats.registry is a subcommand with its own options; ``--format FORMAT`` is the shortcut
(``paretoq-export --format gguf CKPT`` is ``paretoq-export export gguf CKPT``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from formats.registry import FORMATS, format_named
from paretoq_export.arguments import add_output_arguments, add_validation_text_arguments
from paretoq_export.validate import add_threshold_arguments, add_verify_argument, threshold_overrides

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
        add_threshold_arguments(p)
        add_verify_argument(p)


def shortcut(argv: list[str]) -> list[str]:
    """``[export] ... --format NAME ...`` -> ``export NAME ...`` (the --format shortcut, anywhere in the line)."""
    rest = argv[1:] if argv[:1] == ["export"] else argv
    for i, tok in enumerate(rest):
        if tok == "--format" and i + 1 < len(rest):
            return ["export", rest[i + 1], *rest[:i], *rest[i + 2:]]
        if tok.startswith("--format="):
            return ["export", tok.split("=", 1)[1], *rest[:i], *rest[i + 1:]]
    return argv


def final_output(fmt, output: str | None, checkpoint_dir: Path, checkpoint, options) -> Path:
    """Where the export goes: -o itself, or the format's default name inside an existing folder / a path ending
    in a slash / (no -o) the checkpoint's parent folder."""
    if output is None:
        return Path(checkpoint_dir).resolve().parent / fmt.default_name(checkpoint, options)
    if names_a_folder(fmt, output):
        return Path(output) / fmt.default_name(checkpoint, options)
    return Path(output)


def names_a_folder(fmt, output: str) -> bool:
    """-o is a place to put the export in: a path ending in a slash, or an existing folder that is not itself an
    export of a folder format (an ONNX folder given by name is the output; replacing it takes --overwrite)."""
    if output.endswith(("/", os.sep)):
        return True
    if not Path(output).is_dir():
        return False
    try:
        return fmt.detect(Path(output)) is None
    except ValueError:  # a damaged export is an export too
        return False


def run(args: argparse.Namespace) -> int:
    from paretoq_export.canonical.atomic import OutputError, check_output, publish, remove_stale_siblings
    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    fmt = format_named(args.format)
    if args.output is not None:  # an unwritable place fails before the checkpoint is read
        probe = Path(args.output) / "x" if names_a_folder(fmt, args.output) else Path(args.output)
        check_output(probe, overwrite=True, folder=not fmt.suffix)
    ckpt = QuantizedCheckpoint.load(args.checkpoint, verify=args.verify)
    ckpt.load_tokenizer()  # a tokenizer that needs its own code fails here, in one line, before any work
    options = fmt.options_from_args(args)
    output = final_output(fmt, args.output, Path(args.checkpoint), ckpt, options)
    folder = not fmt.suffix
    check_output(output, args.overwrite, folder=folder)
    if not folder and output.suffix != fmt.suffix:
        raise OutputError(f"output {output} does not end in {fmt.suffix}: name the file model{fmt.suffix}, or give "
                          "a folder (an existing one or a path ending in /)")
    created = [d for d in (output.parent, *output.parent.parents) if not d.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    published = False
    try:
        _export_staged(args, fmt, ckpt, options, staging / output.name, output)
        # beside files first (tokenizer.json of a .pte, the validation report), the artifact last: at its final
        # name it is whole
        for extra in sorted(p for p in staging.iterdir() if p.name != output.name):
            target = output.parent / extra.name
            ours = extra.name.startswith(output.name)  # <file>.validation.json: belongs to this export
            if target.exists() and not args.overwrite and not ours and not (
                    target.is_file() and target.read_bytes() == extra.read_bytes()):
                raise OutputError(f"{target} exists and differs from the one this export writes: pass --overwrite or "
                                  "choose another -o")
            publish(extra, target)
        publish(staging / output.name, output)
        published = True
        return 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created if not published else ():  # a failed export leaves no empty folder behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _export_staged(args: argparse.Namespace, fmt, ckpt, options, staged: Path, output: Path) -> None:
    """Export to ``staged``, then read back and validate it there; ValidationFailed (one error line, exit 2,
    nothing published) when the thresholds fail."""
    from formats.validation import readback, report_path, thresholds_for, validate_artifact, verdict_line, write_report
    from paretoq_export.validation_text import (
        ValidationTextError, validate_by_default, validation_text, validation_token_ids,
    )

    artifact = fmt.export(ckpt, staged, options)
    print("\n".join(line.replace(str(staged.parent), str(output.parent)) for line in artifact.summary))
    if not (args.validate if args.validate is not None else validate_by_default(ckpt)):
        readback(fmt, artifact.path, ckpt)  # never publish a file that does not hold the checkpoint
        return
    if artifact.cannot_run_here:
        print(f"validation skipped: {artifact.cannot_run_here}", file=sys.stderr)
        readback(fmt, artifact.path, ckpt)
        return
    try:
        ids = validation_token_ids(ckpt, args.text, fmt.validation_tokens(artifact, args.validate_tokens))
    except ValidationTextError as exc:
        print(f"validation skipped: {exc}", file=sys.stderr)
        readback(fmt, artifact.path, ckpt)
        return
    thresholds = thresholds_for(fmt.name, **threshold_overrides(args))
    report = validate_artifact(artifact.path, ckpt, ids, threads=args.threads, progress=False, thresholds=thresholds,
                               text=validation_text(args.text))
    report["checkpoint"] = str(args.checkpoint)
    report["artifact"] = str(output)
    print(summary(report))
    if not report["verdict"]["passed"]:
        raise ValidationFailed(verdict_line(report) + f"; nothing was written at {output}")
    saved = write_report(report, report_path(artifact.path))
    print(f"validation saved to {output.parent / saved.relative_to(staged.parent)}")


class ValidationFailed(ValueError):
    """The export ran, but its validation failed the thresholds: nothing is published."""


def summary(report: dict) -> str:
    """The validation report in a few lines (the `validate` command prints the full table)."""
    rb, m = report["readback"], report["metrics"]
    tok = report.get("tokenizer")
    lines = [f"read-back: {rb['exact']}/{rb['checked']} tensors bit-exact"
             + (f", not exact: {len(rb['mismatches'])}" if rb["mismatches"] else ""),
             f"{report['runtime']['runtime']} vs PyTorch on {m['tokens']} tokens: mean KL {m['kl_mean']:.2e}, top-1 "
             f"{m['top1']:.1%} (clear margin {m['top1_clear_margin']:.1%}), PPL {m['ppl_artifact']:.3f} vs "
             f"{m['ppl_reference']:.3f} (ratio {m['ppl_ratio']:.4f})"]
    if tok:
        lines.append(f"tokenizer: the artifact's own gives the same ids as transformers on {tok['tokens']} tokens"
                     if tok["equal"] else f"tokenizer: the artifact's own DIFFERS from transformers "
                                          f"({tok.get('agreement', 0):.2%} of ids agree) at {tok['first_difference']}")
    generation = report["checks"].get("generation")
    if generation:
        line = (f"generation: {generation['new_tokens']} greedy tokens with KV cache "
                f"{'equal' if generation['cached_equals_uncached'] else 'DIFFER from'} those without it")
        if "first_difference" in generation:
            line += (f" from token {generation['first_difference']}, where the two picks are "
                     f"{generation['logit_gap']:.3f} logits apart in the full recompute")
        lines.append(line)
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
