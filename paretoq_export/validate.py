"""`paretoq-export validate ARTIFACT --checkpoint CKPT`: run an exported file in its own runtime and compare it with
the PyTorch reference rebuilt from the checkpoint it was exported from.

    paretoq-export validate model.gguf --checkpoint ckpt [--text FILE] [--tasks all | arc_easy piqa ...]
                   [--limit N] [--json out.json] [--plot zeroshot.png] [--threads 2] [--validate-tokens 512]

The format comes from the file's content (formats.registry.detect_artifact): a GGUF file (llama.cpp), an ONNX
folder holding ``model.onnx`` or that file itself (onnxruntime), a ``.pte`` file (ExecuTorch). Reported (the one
validation every caller runs, formats.validation):

- read-back: every tensor decoded from the file equals the checkpoint's bit for bit (GGUF: gguf-py dequantizes
  each tensor; ONNX: onnxruntime decodes each MatMulNBits weight, float initializers compared directly). A
  difference is an error naming the tensor. ExecuTorch: the linear weights live inside XNNPACK delegate blobs
  without tensor names, so nothing is read back and the logits carry the check (said in ``readback.note``).
- logits on held-out text (the same text every exporter validates on: paretoq_export.validation_text): mean
  KL(reference || artifact), top-1 agreement, perplexity of both and their ratio; the format's own runtime checks
  (ONNX: cached vs uncached generation; ExecuTorch: KV-cached decode vs recompute).
- optionally zero-shot accuracy (runtime_tests.zeroshot) of the reference and of the artifact, side by side.

Pass/fail: mean KL, clear-margin top-1 and PPL ratio against the format's thresholds (ExportFormat.thresholds;
GGUF and ONNX: KL <= 1e-2, top-1 >= 95%, PPL ratio within 1.02; ExecuTorch: 5e-2, 90%, 1.05), changed with
--max-kl / --min-top1 / --max-ppl-ratio. A failed validation prints one ``error: validation failed: ...`` line
and exits 2, as every failure does (the report is still written).

JSON (``--json``): the schema of formats.validation, the same the exporters' --validate write and the card reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from formats.validation import ValidateError, thresholds_for, validate_artifact, verdict_line, write_report
from paretoq_export.arguments import add_validation_text_arguments
from paretoq_export.canonical.atomic import atomic_file, check_output
from paretoq_export.validation_text import DEFAULT_TOKENS, validation_text, validation_token_ids


def validate(artifact: str | Path, checkpoint: str | Path, text: str | None = None, tasks: Sequence[str] = (),
             limit: int | None = None, threads: int = 2, tokens: int = DEFAULT_TOKENS, progress: bool = True,
             thresholds: dict | None = None, verify: bool = True) -> dict:
    """Validate an exported file against its checkpoint on the validation text (``text``: a file, default the
    held-out Wikipedia documents); zero-shot ``tasks`` (names or ["all"]) with ``limit`` examples each;
    ``thresholds``: max_kl / min_top1 / max_ppl_ratio over the format's defaults."""
    from formats.registry import detect_artifact
    from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
    from runtime_tests import zeroshot

    fmt, _ = detect_artifact(artifact)  # a wrong path or task list fails before the checkpoint is read
    if zeroshot.parse_tasks(tasks):
        zeroshot.task_data_dir()
    ckpt = QuantizedCheckpoint.load(checkpoint, verify=verify)
    report = validate_artifact(artifact, ckpt, validation_token_ids(ckpt, text, tokens), tasks=tasks, limit=limit,
                               threads=threads, progress=progress,
                               thresholds=thresholds_for(fmt.name, **(thresholds or {})), text=validation_text(text))
    report["checkpoint"] = str(checkpoint)
    return report


# ----------------------------------------------------------------------------------------------- output
def format_report(report: dict) -> str:
    from runtime_tests.zeroshot import format_table

    rb, m = report["readback"], report["metrics"]
    lines = [f"{report['format']} {report['artifact']} ({report['artifact_bytes'] / 2**20:.2f} MiB) vs checkpoint "
             f"{report['checkpoint']}"]
    exact = f"{rb['exact']}/{rb['checked']} tensors bit-exact" if rb["checked"] else "not read back"
    lossy = rb["mismatches"]
    more = f" (+{len(lossy) - 3} more)" if len(lossy) > 3 else ""
    lines.append(f"{'read-back':<22}{exact}" + (f"; not exact: {', '.join(lossy[:3])}{more}" if lossy else ""))
    if not rb["checked"] or rb["mismatches"]:
        lines.append(f"{'':<22}{rb['note']}")
    tok = report.get("tokenizer")
    if tok:
        lines.append(f"{'tokenizer':<22}" + (f"same ids as transformers on {tok['tokens']} tokens" if tok["equal"]
                                             else f"DIFFERS from transformers ({tok.get('agreement', 0):.2%} of ids agree) at "
                                                  f"{tok['first_difference']}"))
    lines += [
        f"{'tokens':<22}{m['tokens']}",
        f"{'mean KL (nats)':<22}{m['kl_mean']:.3e}",
        f"{'top-1 agreement':<22}{m['top1']:.2%}" + (f" (clear margin {m['top1_clear_margin']:.2%})"
                                                     if m.get("top1_clear_margin") is not None else ""),
        f"{'PPL reference':<22}{m['ppl_reference']:.4f}",
        f"{'PPL artifact':<22}{m['ppl_artifact']:.4f} (ratio {m['ppl_ratio']:.5f})",
    ]
    if report.get("zeroshot"):
        zs = report["zeroshot"]
        both = {"reference": zs["reference"], "artifact": zs["artifact"]}
        limit = (report.get("zeroshot_settings") or {}).get("limit")
        lines += ["", "zero-shot acc" + (f" (limit {limit} per task)" if limit else ""),
                  format_table(both, "acc"), "", "zero-shot acc_norm", format_table(both, "acc_norm")]
    lines.append(f"{'seconds':<22}{report['seconds']:.1f}")
    lines.append(f"{'verdict':<22}{'pass' if report['verdict']['passed'] else 'FAIL'} (thresholds "
                 + ", ".join(f"{k} {v:g}" for k, v in report["verdict"]["thresholds"].items()) + ")")
    return "\n".join(lines)


def plot_zeroshot(report: dict, path: str | os.PathLike) -> Path:
    """PNG of the zero-shot accuracies, reference vs artifact per task (acc solid, acc_norm hatched); atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = report["zeroshot"]
    tasks = list(zs["reference"])
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 4))
    for j, (side, color) in enumerate((("reference", "#4C72B0"), ("artifact", "#DD8452"))):
        for k, (metric, hatch) in enumerate((("acc", None), ("acc_norm", "//"))):
            values = [100 * zs[side][t][metric] for t in tasks]
            ax.bar(x + (2 * j + k - 1.5) * 0.2, values, 0.2, color=color, hatch=hatch, edgecolor="white",
                   label=f"{side} {metric}")
    ax.set_xticks(x, tasks, rotation=20)
    ax.set_ylabel("accuracy (%)")
    n = (report.get("zeroshot_settings") or {}).get("limit")
    ax.set_title(f"zero-shot: PyTorch reference vs {report['format']} ({Path(report['artifact']).name})"
                 + (f", {n} examples per task" if n else ""), fontsize=9)
    ax.set_ylim(0, 118)  # headroom: the legend sits above the tallest possible bar
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


HELP = "run an exported file in its runtime and compare it with the checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help=".gguf file, ONNX folder (model.onnx) or .pte file")
    parser.add_argument("--checkpoint", required=True, help="the paretoq checkpoint the artifact was exported from")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                        help="zero-shot tasks, or 'all': arc_easy arc_challenge boolq piqa siqa hellaswag obqa winogrande")
    parser.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (seeded subset)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="bar chart of the zero-shot accuracies (needs --tasks)")
    add_validation_text_arguments(parser, "CPU threads for the runtime and the reference")
    add_threshold_arguments(parser)
    add_verify_argument(parser)


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-kl / --min-top1 / --max-ppl-ratio: the validation's pass/fail bounds (default: the format's)."""
    from formats.registry import FORMATS

    def defaults(bound: str) -> str:
        return "default: " + ", ".join(f"{f.title} {getattr(f.thresholds, bound):g}" for f in FORMATS.values())

    parser.add_argument("--max-kl", type=float, default=None, help=f"fail above this mean KL ({defaults('max_kl')})")
    parser.add_argument("--min-top1", type=float, default=None,
                        help=f"fail below this clear-margin top-1 agreement, 0..1 ({defaults('min_top1')})")
    parser.add_argument("--max-ppl-ratio", type=float, default=None,
                        help=f"fail when PPL artifact/reference, or its inverse, exceeds this "
                             f"({defaults('max_ppl_ratio')})")


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="load a checkpoint whose config/weights hashes are missing or differ (at your risk)")


def threshold_overrides(args: argparse.Namespace) -> dict:
    return {"max_kl": args.max_kl, "min_top1": args.min_top1, "max_ppl_ratio": args.max_ppl_ratio}


def run(args: argparse.Namespace) -> int:
    import torch

    if args.plot and not args.tasks:
        raise ValidateError("--plot draws the zero-shot accuracies: add --tasks (e.g. --tasks all --limit 200)")
    torch.set_num_threads(args.threads)
    for output in (args.json, args.plot):
        if output:
            check_output(output, overwrite=True)  # an unwritable report fails before the runtime runs
    report = validate(args.artifact, args.checkpoint, text=args.text, tasks=args.tasks, limit=args.limit,
                      threads=args.threads, tokens=args.validate_tokens, thresholds=threshold_overrides(args),
                      verify=args.verify)
    print(format_report(report))
    if args.json:
        print(f"report saved to {write_report(report, args.json)}")
    if args.plot:
        print(f"plot saved to {plot_zeroshot(report, args.plot)}")
    if not report["verdict"]["passed"]:
        print(f"error: {verdict_line(report)}", file=sys.stderr)
        return 2
    return 0
