"""One validation of an exported file against the checkpoint it was written from, for every format and every
caller (`validate`, each exporter's --validate, `pareto`): read-back, logits in the runtime vs the PyTorch
reference, the format's own runtime checks, optionally zero-shot accuracy. One result schema::

    {"format", "artifact", "artifact_bytes", "checkpoint",
     "readback": {"checked", "exact", "mismatches", "note"},
     "metrics": {"tokens", "kl_mean", "top1", "ppl_reference", "ppl_artifact", "ppl_ratio", "kl_max",
                 "top1_clear_margin", "max_abs_diff", "max_rel_diff"},
     "checks": {...the format's extra checks (KV cache vs recompute, ...)},
     "zeroshot": {"reference": {...}, "artifact": {...}} | null, "zeroshot_settings", "runtime", "seconds"}

written atomically by ``write_report``; the model card reads it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from formats.protocol import ArtifactError, ExportFormat
from formats.registry import detect_artifact
from paretoq_export.canonical.atomic import write_text_atomic
from paretoq_export.canonical.checkpoint import QuantizedCheckpoint, open_checkpoint

ZEROSHOT_MAX_LENGTH = 1024  # tokens per zero-shot request (context window), the same on both sides
REPORT_SUFFIX = ".validation.json"  # an exporter's report, beside its file


class ValidateError(ArtifactError):
    """A validation the user can fix (corrupted artifact, wrong checkpoint, ...): one line naming problem and fix."""


def readback(fmt: ExportFormat, path: Path, ckpt: QuantizedCheckpoint) -> dict:
    """The format's bit-exact comparison; a mismatch becomes one ValidateError line naming the tensor."""
    try:
        return fmt.readback(path, ckpt)
    except ArtifactError:  # already one complete line
        raise
    except ValueError as exc:  # ReadbackMismatch and the formats' own errors: the message names the tensor
        raise ValidateError(f"read-back of {path} failed: {exc} (the file is corrupt or was not exported from "
                            "this checkpoint: re-export it)") from exc


def reference_logits(ckpt: QuantizedCheckpoint, ids: Sequence[int], model=None) -> np.ndarray:
    """[T, V] float64 logits of the PyTorch model rebuilt from the checkpoint."""
    import torch

    model = model if model is not None else ckpt.build_reference_model()
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


def validate_artifact(artifact: str | os.PathLike, checkpoint: QuantizedCheckpoint | str | os.PathLike,
                      token_ids: Sequence[int], tasks: Sequence[str] = (), limit: int | None = None,
                      threads: int = 2, progress: bool = True, reference: np.ndarray | None = None,
                      check_options: dict | None = None) -> dict:
    """Validate an exported file against its checkpoint on ``token_ids``; returns the report (module docstring).

    ``tasks``: zero-shot task names or ["all"]; ``limit``: examples per task (seeded subset); ``reference``: the
    PyTorch logits of ``token_ids`` when already computed (one reference run shared by several files);
    ``check_options``: keyword arguments of the format's extra checks (ExecuTorch: kv_prefill)."""
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
    ids = [int(t) for t in token_ids]

    max_positions = int(ckpt.config.get("max_position_embeddings") or ZEROSHOT_MAX_LENGTH)
    zs_length = min(ZEROSHOT_MAX_LENGTH, max_positions)
    runner = fmt.open_runner(path, threads, n_ctx=max(len(ids), zs_length if task_names else 0, 64))
    try:
        window = fmt.runtime_window(runner)
        if window is not None and len(ids) > window:
            ids = ids[:window]  # ExecuTorch: the export's max_seq_len bounds one call
        reference_model = ckpt.build_reference_model()
        ref = reference[: len(ids)] if reference is not None else reference_logits(ckpt, ids, reference_model)
        test = np.asarray(runner.logits(ids), dtype=np.float64)
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
    return {"format": fmt.name, "artifact": str(artifact), "artifact_bytes": fmt.artifact_bytes(path),
            "checkpoint": str(ckpt_dir) if ckpt_dir is not None else "(in memory)",
            "readback": rb, "metrics": metrics, "checks": checks, "zeroshot": zs, "zeroshot_settings": zs_settings,
            "runtime": {**info, "threads": threads}, "seconds": time.perf_counter() - start}


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Atomic write: a reader (the model card, a resumed sweep) never sees half a file."""
    return write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def report_path(artifact: str | os.PathLike) -> Path:
    """Where an exporter's --validate writes its report: ``<file>.validation.json`` beside a file, and inside an
    ONNX folder ``validation.json`` (the folder is what gets uploaded)."""
    artifact = Path(artifact)
    return artifact / REPORT_SUFFIX.lstrip(".") if artifact.is_dir() else Path(str(artifact) + REPORT_SUFFIX)
