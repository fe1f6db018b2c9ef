"""One validation of an exported file against the checkpoint it was written from, for every format and every
caller (`validate`, each exporter's --validate, `pareto`): read-back, logits in the runtime vs the PyTorch
reference, the format's own runtime checks, optionally zero-shot accuracy. One result schema::

    {"format", "artifact", "artifact_bytes", "checkpoint",
     "readback": {"checked", "exact", "mismatches", "note"},
     "metrics": {"tokens", "kl_mean", "top1", "ppl_reference", "ppl_artifact", "ppl_ratio", "kl_max",
                 "top1_clear_margin", "max_abs_diff", "max_rel_diff"},
     "checks": {...the format's extra checks (KV cache vs recompute, ...)},
     "tokenizer": {"tokens", "artifact_tokens", "equal", "first_difference"} | null,
     "zeroshot": {"reference": {...}, "artifact": {...}} | null, "zeroshot_settings", "runtime", "seconds",
     "verdict": {"passed", "failures", "thresholds"}}

written atomically by ``write_report``; the model card reads it. The verdict judges the metrics against pass/fail
thresholds (``ExportFormat.thresholds``, per format; every caller can change them): the weights are exact, so what
remains is activation arithmetic (int8 activations in ExecuTorch), and a wrong norm epsilon, rope or vocabulary
fails clearly.
Every failure to read or open the artifact is one ValidateError line: a damaged file is the user's to re-export.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from formats.protocol import ArtifactError, ExportFormat, Thresholds
from formats.registry import detect_artifact, format_named
from paretoq_export.canonical.atomic import write_text_atomic
from paretoq_export.canonical.checkpoint import QuantizedCheckpoint, open_checkpoint

ZEROSHOT_MAX_LENGTH = 1024  # tokens per zero-shot request (context window), the same on both sides
REPORT_SUFFIX = ".validation.json"  # an exporter's report, beside its file


class ValidateError(ArtifactError):
    """A validation the user can fix (corrupted artifact, wrong checkpoint, ...): one line naming problem and fix."""


def thresholds_for(format_name: str, max_kl: float | None = None, min_top1: float | None = None,
                   max_ppl_ratio: float | None = None) -> Thresholds:
    """The format's thresholds (ExportFormat.thresholds) with any given one put over it."""
    given = {k: v for k, v in dict(max_kl=max_kl, min_top1=min_top1, max_ppl_ratio=max_ppl_ratio).items()
             if v is not None}
    return replace(format_named(format_name).thresholds, **given)


def judge(report: dict, thresholds: Thresholds) -> dict:
    """The verdict of a report: {"passed", "failures" (one phrase each), "thresholds"}."""
    m, failures = report["metrics"], []
    kl, top1, ratio = m.get("kl_mean"), m.get("top1_clear_margin"), m.get("ppl_ratio")
    if kl is None or kl > thresholds.max_kl:
        failures.append(f"mean KL {kl:.3g} > {thresholds.max_kl:g}" if kl is not None else "mean KL is not finite")
    if top1 is None:  # no clear-margin position: judge on plain top-1
        top1 = m.get("top1")
    if top1 is not None and top1 < thresholds.min_top1:
        failures.append(f"top-1 agreement {top1:.2%} < {thresholds.min_top1:.0%}")
    if ratio is None or max(ratio, 1 / ratio) > thresholds.max_ppl_ratio:
        failures.append(f"PPL ratio {ratio:.4f} outside 1/{thresholds.max_ppl_ratio:g}..{thresholds.max_ppl_ratio:g}"
                        if ratio is not None else "PPL ratio is not finite")
    for name, check in report.get("checks", {}).items():
        if isinstance(check, dict) and check.get("passed") is False:
            failures.append(f"{name} check failed")
    tokenizer = report.get("tokenizer")
    if tokenizer and tokenizer.get("equal") is False and not tokenizer.get("acceptable", False):
        failures.append(f"the artifact's tokenizer gives other ids than transformers ({tokenizer['agreement']:.1%} "
                        f"agree; {tokenizer['first_difference']})")
    return {"passed": not failures, "failures": failures, "thresholds": asdict(thresholds)}


def readback(fmt: ExportFormat, path: Path, ckpt: QuantizedCheckpoint) -> dict:
    """The format's bit-exact comparison; a mismatch becomes one ValidateError line naming the tensor."""
    try:
        return fmt.readback(path, ckpt)
    except ArtifactError:  # already one complete line
        raise
    except ValueError as exc:  # ReadbackMismatch and the formats' own errors: the message names the tensor
        raise ValidateError(f"read-back of {path} failed: {exc} (the file is corrupt or was not exported from "
                            "this checkpoint: re-export it)") from exc
    except Exception as exc:  # a parser failing on damaged bytes (struct, numpy, protobuf errors)
        raise ValidateError(f"cannot read {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:400]}): the "
                            "file is damaged or truncated; re-export it") from exc


def open_runner(fmt: ExportFormat, path: Path, threads: int, n_ctx: int):
    """The format's runner; a runtime that refuses the file is one ValidateError line."""
    try:
        return fmt.open_runner(path, threads, n_ctx=n_ctx)
    except ImportError:
        raise
    except Exception as exc:
        raise ValidateError(f"{fmt.runtime} cannot load {path} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:400]}): the file is damaged or was written by an "
                            "incompatible version; re-export it") from exc


TOKENIZER_CHECK_CHARS = 20_000  # of the validation text: every script and punctuation of it, in well under a second
MIN_TOKEN_AGREEMENT = 0.99  # share of the ids that must match in order (difflib alignment) for validation to pass


def compare_tokenizers(fmt: ExportFormat, path: Path, ckpt: QuantizedCheckpoint, text: str) -> dict | None:
    """Whether the artifact's own tokenizer (GGUF's embedded vocabulary, the tokenizer file beside a .pte or in an
    ONNX folder) turns ``text`` into the ids transformers gives with the checkpoint's tokenizer: logits fed with
    ids cannot see a wrong vocabulary. None where the artifact carries no tokenizer or the checkpoint has none."""
    tokenizer = ckpt.load_tokenizer()
    if tokenizer is None:
        return None
    text = text[:TOKENIZER_CHECK_CHARS]
    try:
        ids = fmt.tokenize(path, text)
    except ImportError:
        raise
    except Exception as exc:  # a damaged tokenizer file or vocabulary
        raise ValidateError(f"the tokenizer of {path} cannot be read ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:400]}): re-export it") from exc
    if ids is None:
        return None
    expected = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    ids = [int(t) for t in ids]
    # A wrong vocabulary changes nearly every token; a runtime's pre-tokenizer corner case (llama.cpp splits "½"
    # unlike transformers in SmolLM2's text) a handful. Both are reported; only the first fails validation.
    import difflib

    matched = sum(b.size for b in difflib.SequenceMatcher(None, expected, ids, autojunk=False).get_matching_blocks())
    agreement = matched / max(1, len(expected), len(ids))
    result = {"tokens": len(expected), "artifact_tokens": len(ids), "equal": ids == expected,
              "agreement": agreement, "acceptable": agreement >= MIN_TOKEN_AGREEMENT, "first_difference": None}
    if ids != expected:
        i = next((k for k, (a, b) in enumerate(zip(expected, ids)) if a != b), min(len(ids), len(expected)))
        def around(seq: list[int]):
            return tokenizer.convert_ids_to_tokens(seq[i:i + 3]) if i < len(seq) else "end of text"

        result["first_difference"] = f"token {i}: transformers {around(expected)}, artifact {around(ids)}"
    return result


def reference_logits(ckpt: QuantizedCheckpoint, ids: Sequence[int], model=None) -> np.ndarray:
    """[T, V] float64 logits of the PyTorch model rebuilt from the checkpoint."""
    import torch

    model = model if model is not None else ckpt.build_reference_model()
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


def validate_artifact(artifact: str | os.PathLike, checkpoint: QuantizedCheckpoint | str | os.PathLike,
                      token_ids: Sequence[int], tasks: Sequence[str] = (), limit: int | None = None,
                      threads: int = 2, progress: bool = True, reference: np.ndarray | None = None,
                      check_options: dict | None = None, thresholds: Thresholds | None = None,
                      text: str | None = None) -> dict:
    """Validate an exported file against its checkpoint on ``token_ids``; returns the report (module docstring).

    ``tasks``: zero-shot task names or ["all"]; ``limit``: examples per task (seeded subset); ``reference``: the
    PyTorch logits of ``token_ids`` when already computed (one reference run shared by several files);
    ``check_options``: keyword arguments of the format's extra checks (ExecuTorch: kv_prefill); ``thresholds``:
    the verdict's bounds (default: the format's, ExportFormat.thresholds); ``text``: the validation text, to
    compare the artifact's own tokenizer with transformers' on it."""
    import torch

    from runtime_tests import zeroshot
    from runtime_tests.metrics import compare_logits

    start = time.perf_counter()
    fmt, path = detect_artifact(artifact)
    task_names = zeroshot.parse_tasks(tasks)
    if task_names:
        zeroshot.task_data_dir()  # missing task data: fail before any slow work
    ckpt, ckpt_dir = open_checkpoint(checkpoint)
    rb = readback(fmt, path, ckpt)
    tokenizer_check = compare_tokenizers(fmt, path, ckpt, text) if text else None
    max_positions = int(ckpt.config.get("max_position_embeddings") or ZEROSHOT_MAX_LENGTH)
    ids = [int(t) for t in token_ids][:max_positions]  # beyond the trained positions runtimes may refuse (ONNX)

    zs_length = min(ZEROSHOT_MAX_LENGTH, max_positions)
    runner = open_runner(fmt, path, threads, n_ctx=max(len(ids), zs_length if task_names else 0, 64))
    try:
        window = fmt.runtime_window(runner)
        if window is not None and len(ids) > window:
            ids = ids[:window]  # ExecuTorch: the export's max_seq_len bounds one call
        reference_model = ckpt.build_reference_model()
        ref = reference[: len(ids)] if reference is not None else reference_logits(ckpt, ids, reference_model)
        try:
            test = np.asarray(runner.logits(ids), dtype=np.float64)
        except Exception as exc:  # the runtime loaded the file but fails running it: damaged graph or tables
            raise ValidateError(f"{fmt.runtime} fails running {path} ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:400]}): the file is damaged; re-export it") from exc
        if test.shape != ref.shape:
            raise ValidateError(f"{path} returns logits {test.shape} where the checkpoint's model gives {ref.shape}: "
                                "the artifact was not exported from this checkpoint")
        m = compare_logits(ref[:-1], test[:-1], ids[1:])
        metrics = {"tokens": len(ids), "kl_mean": m["mean_kl"], "top1": m["top1_agreement"],
                   "ppl_reference": m["ppl_ref"], "ppl_artifact": m["ppl_test"], "ppl_ratio": m["ppl_ratio"],
                   "kl_max": m["max_kl"], "top1_clear_margin": m["top1_agreement_clear_margin"],
                   "max_abs_diff": m["max_abs_diff"],
                   "max_rel_diff": float(np.abs(ref - test).max() / np.abs(ref).max())}
        metrics = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
        checks = fmt.extra_checks(path, ckpt, runner, ids, ref, **(check_options or {}))
        zs = zs_settings = None
        if task_names:
            tokenizer = ckpt.load_tokenizer()
            length = min(zs_length, window) if window is not None else zs_length
            device = "cuda" if torch.cuda.is_available() else "cpu"
            zs = {"reference": zeroshot.evaluate_tasks(zeroshot.torch_loglik_fn(reference_model, device, max_length=length),
                                                       tokenizer, task_names, limit, progress, desc="reference"),
                  "artifact": zeroshot.evaluate_tasks(zeroshot.runtime_loglik_fn(runner, max_length=length),
                                                      tokenizer, task_names, limit, progress, desc=fmt.name)}
            zs_settings = {"tasks": list(task_names), "limit": limit, "seed": 0, "max_length": length}
        info = fmt.runtime_info(path, runner)
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    report = {"format": fmt.name, "artifact": str(artifact), "artifact_bytes": fmt.artifact_bytes(path),
              "checkpoint": str(ckpt_dir) if ckpt_dir is not None else "(in memory)",
              "readback": rb, "metrics": metrics, "checks": checks, "zeroshot": zs, "zeroshot_settings": zs_settings,
              "runtime": {**info, "threads": threads}, "tokenizer": tokenizer_check,
              "seconds": time.perf_counter() - start}
    report["verdict"] = judge(report, thresholds or thresholds_for(fmt.name))
    return report


def verdict_line(report: dict) -> str:
    """One line: passed, or which thresholds failed and how to proceed."""
    v = report["verdict"]
    if v["passed"]:
        return "validation passed"
    alternative = format_named(report["format"]).exact_alternative(report.get("runtime") or {})
    exact_option = f", or {alternative}" if alternative else ""
    return (f"validation failed: {'; '.join(v['failures'])} (the artifact does not behave like the checkpoint's "
            "model: check that it was exported from this checkpoint, or loosen --max-kl / --min-top1 / "
            f"--max-ppl-ratio for a lossy export{exact_option})")


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Atomic write: a reader (the model card, a resumed sweep) never sees half a file."""
    return write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def report_path(artifact: str | os.PathLike) -> Path:
    """Where an exporter's --validate writes its report: ``<file>.validation.json`` beside a file, and inside an
    ONNX folder ``validation.json`` (the folder is what gets uploaded)."""
    artifact = Path(artifact)
    return artifact / REPORT_SUFFIX.lstrip(".") if artifact.is_dir() else Path(str(artifact) + REPORT_SUFFIX)
