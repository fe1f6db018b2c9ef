"""`paretoq-export validate ARTIFACT --checkpoint CKPT`: run an exported file in its own runtime and compare it with
the PyTorch reference rebuilt from the checkpoint it was exported from.

    paretoq-export validate model.gguf --checkpoint ckpt [--text FILE] [--tasks all | arc_easy piqa ...]
                   [--limit N] [--json out.json] [--plot zeroshot.png] [--threads 2] [--max-tokens 512]

The format comes from the path (and the file's magic bytes): a ``.gguf`` file (llama.cpp), an ONNX folder holding
``model.onnx`` or the ``.onnx`` file itself (onnxruntime), a ``.pte`` file (ExecuTorch). Reported:

- read-back: every tensor decoded from the file equals the checkpoint's bit for bit (GGUF: gguf-py dequantizes
  each tensor; ONNX: onnxruntime decodes each MatMulNBits weight, float initializers compared directly). A
  difference is an error naming the tensor. ExecuTorch: the linear weights live inside XNNPACK delegate blobs
  without tensor names, so nothing is read back and the logits carry the check (said in ``readback.note``).
- logits on held-out text (the same text every exporter validates on: formats.gguf_cli.validation_text): mean
  KL(reference || artifact), top-1 agreement, perplexity of both and their ratio.
- optionally zero-shot accuracy (runtime_tests.zeroshot) of the reference and of the artifact, side by side.

JSON (``--json``), consumed by the bench/pareto/card commands::

    {"format", "artifact", "artifact_bytes", "checkpoint",
     "readback": {"checked", "exact", "mismatches", "note"},
     "metrics": {"tokens", "kl_mean", "top1", "ppl_reference", "ppl_artifact", "ppl_ratio", ...},
     "zeroshot": {"reference": {...}, "artifact": {...}} | null, "seconds"}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from paretoq_export.atomic import atomic_file, write_text_atomic

FORMATS = ("gguf", "onnx", "executorch")
ONNX_MODEL_FILE = "model.onnx"  # formats.onnx.MODEL_FILE (not imported here: onnx is an optional extra)
ONNX_GENAI_CONFIG = "genai_config.json"
ZEROSHOT_MAX_LENGTH = 1024  # tokens per zero-shot request (context window), the same on both sides


class ValidateError(ValueError):
    """A validation the user can fix (unknown format, corrupted artifact, ...): one line naming problem and fix."""


# ----------------------------------------------------------------------------------------------- format
def detect_format(artifact: str | os.PathLike) -> tuple[str, Path]:
    """("gguf" | "onnx" | "executorch", the path its runtime opens: the file, or the ONNX folder)."""
    path = Path(artifact)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give a .gguf file, an ONNX folder (model.onnx) or a .pte file")
    if path.is_dir():
        if (path / ONNX_MODEL_FILE).is_file():
            return "onnx", path
        raise ValidateError(f"{path} is a folder without {ONNX_MODEL_FILE}: give a .gguf file, an exported ONNX "
                            "folder or a .pte file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"GGUF":
        return "gguf", path
    if head[4:6] == b"ET":  # ExecuTorch flatbuffer file identifier (program.fbs: "ET12")
        return "executorch", path
    if path.suffix == ".onnx":
        if not (path.parent / ONNX_GENAI_CONFIG).is_file() or path.name != ONNX_MODEL_FILE:
            raise ValidateError(f"{path} is not inside an exported ONNX folder ({ONNX_MODEL_FILE} + "
                                f"{ONNX_GENAI_CONFIG}): export it with `paretoq-export --format onnx`")
        return "onnx", path.parent
    if path.suffix in (".gguf", ".pte"):
        raise ValidateError(f"{path} has a {path.suffix} name but not its magic bytes ({head[:8]!r}): the file is "
                            "truncated or not an export; re-export it")
    raise ValidateError(f"cannot tell the format of {path}: give a .gguf file, an ONNX folder (model.onnx) or a "
                        ".pte file")


def artifact_bytes(fmt: str, path: Path) -> int:
    """Bytes of what the runtime loads: the file, or model.onnx plus its external data (not the tokenizer)."""
    if fmt == "onnx":
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith(ONNX_MODEL_FILE))
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- read-back
def _readback(fmt: str, path: Path, ckpt) -> dict:
    """Bit-exact comparison of the file's tensors with the checkpoint; a mismatch raises ValidateError."""
    try:
        if fmt == "gguf":
            from formats.gguf import verify_gguf_readback

            rb = verify_gguf_readback(path, ckpt)
            lossy = sorted(rb["lossy"])
            note = ("every tensor dequantized by gguf-py equals the checkpoint bit for bit" if not lossy else
                    f"{len(lossy)} tensors were exported lossy on request (--allow-lossy); max |error| "
                    f"{max(rb['lossy'].values()):.3g}; all others bit-exact")
            return {"checked": rb["tensors"], "exact": rb["exact"], "mismatches": lossy, "note": note}
        if fmt == "onnx":
            from formats.onnx_validate import verify_onnx_readback

            rb = verify_onnx_readback(path, ckpt, progress=None)
            return {"checked": rb["tensors"], "exact": rb["tensors"], "mismatches": [],
                    "note": f"{rb['matmulnbits']} MatMulNBits weights decoded by onnxruntime and {rb['float']} float "
                            "initializers equal the checkpoint bit for bit"}
    except ValueError as exc:  # formats' ReadbackMismatch: the message names the tensor
        raise ValidateError(f"read-back of {path} failed: {exc} (the file is corrupt or was not exported from "
                            "this checkpoint: re-export it)") from exc
    return _executorch_readback(path, ckpt)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _xnnpack_weight_bytes(qdata: np.ndarray, bits: int) -> bytes:
    """A weight's bytes as the XNNPACK delegate serializes them (executorch/backends/xnnpack/operators/
    node_visitor.py): int8 as is; int4 ("qc4w") offset by 8 and packed two per byte, even column in the low nibble,
    rows padded to an even length."""
    if bits != 4:
        return np.ascontiguousarray(qdata, dtype=np.int8).tobytes()
    q = ((qdata.astype(np.int16) + 8) & 0xFF).astype(np.uint8)
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
    flat = q.reshape(-1)
    return (flat[1::2] << 4 | flat[0::2]).astype(np.uint8).tobytes()


def _executorch_readback(path: Path, ckpt) -> dict:
    """The .pte's XNNPACK constants vs the checkpoint. XNNPACK files every constant in the program's named data
    under the sha256 of its bytes (scales under "scale_" + sha256), without tensor names: each quantized linear's
    expected int4/int8 codes and scales are rebuilt from the checkpoint (formats.executorch_weights.intx_weight,
    the exporter's own container) and looked up by content; every entry's bytes must hash to its key (a flipped
    byte is named through the tensor whose key it carries)."""
    import torch

    from formats.executorch_weights import container_for, intx_weight

    try:
        from executorch.exir._serialize._program import deserialize_pte_binary
    except ImportError as exc:
        raise ImportError("reading .pte files needs executorch: pip install 'paretoq-export[executorch]'") from exc
    named = deserialize_pte_binary(path.read_bytes()).named_data
    entries = named.pte_data if named is not None else {}

    def data(key: str) -> bytes:
        return bytes(named.buffers[entries[key].buffer_index])

    emb = "model.embed_tokens.weight"
    linears = {("lm_head.weight" if k == emb else k): q for k, q in ckpt.quantized.items()
               if k != emb or ckpt.tied}  # an embedding table is a lookup outside XNNPACK, unless tied to lm_head
    owner: dict[str, str] = {}
    expected = {}
    for name, q in linears.items():
        for target in ("x86", "x86-int8"):  # int4 (default) or int8 container, whichever the file holds
            container = container_for(q.grid, target)
            w = intx_weight(q.codes, q.scale, q.grid, target)
            key = _sha256(_xnnpack_weight_bytes(w.qdata.numpy(), container.bits))
            if key in entries:
                break
        scale32 = w.scale.reshape(-1).to(torch.float32).contiguous()
        scale16 = scale32.to(torch.bfloat16)  # XNNPACK's per-channel-group (qb4w) path stores bf16 scales
        keys = {"fp32": "scale_" + _sha256(scale32.numpy().tobytes()),
                "bf16": "scale_" + _sha256(scale16.view(torch.int16).numpy().tobytes())}
        expected[name] = (key, keys, scale32, scale16)
        owner[key] = name
        owner.update({k: f"{name} (scales)" for k in keys.values()})
    for key in entries:
        bare = key.removeprefix("scale_")
        if len(bare) == 64 and _sha256(data(key)) != bare:
            raise ValidateError(f"read-back of {path} failed: {owner.get(key, f'XNNPACK constant {key[:16]}...')} "
                                "does not match its content hash (the file is corrupt: re-export it)")
    exact, lossy, rel_err = 0, [], 0.0
    head = ckpt.tensors.get("lm_head.weight", ckpt.tensors.get(emb) if ckpt.tied and emb not in ckpt.quantized else None)
    head_note = ""
    if head is not None and "lm_head.weight" not in linears:  # a float output layer: XNNPACK keeps it in fp32
        if _sha256(head.to(torch.float32).contiguous().numpy().tobytes()) in entries:
            exact += 1
            linears = {**linears, "lm_head.weight": None}
        else:
            head_note = "; the float lm_head was not found among the XNNPACK constants"
    for name, (key, scale_keys, scale32, scale16) in expected.items():
        if key not in entries:
            raise ValidateError(f"read-back of {path} failed: the codes of {name} are not in the .pte (it was not "
                                "exported from this checkpoint, or for another --target: re-export it)")
        if scale_keys["fp32"] in entries or (scale_keys["bf16"] in entries and torch.equal(scale16.float(), scale32)):
            exact += 1
        elif scale_keys["bf16"] in entries:
            lossy.append(name)
            rel_err = max(rel_err, float(((scale16.float() - scale32).abs() / scale32.abs()).max()))
        else:
            raise ValidateError(f"read-back of {path} failed: the scales of {name} are not in the .pte (it was not "
                                "exported from this checkpoint: re-export it)")
    n_quant = sum(q is not None for q in linears.values())
    note = (f"{n_quant} quantized linears{' and the float lm_head' if n_quant < len(linears) else ''} found in the "
            f"XNNPACK constants by content hash, codes bit-exact; norms and embedding table not read back{head_note}")
    if lossy:
        note += (f"; {len(lossy)} linears have their per-row scales stored as bf16 by XNNPACK's int4 path (max "
                 f"relative error {rel_err:.2g}): not bit-exact")
    return {"checked": len(linears), "exact": exact, "mismatches": lossy, "note": note}


# ----------------------------------------------------------------------------------------------- runtimes
def _open_runner(fmt: str, path: Path, threads: int, n_ctx: int):
    if fmt == "gguf":
        from runtime_tests.llamacpp import LlamaCppRunner

        return LlamaCppRunner(path, n_threads=threads, n_ctx=n_ctx)
    if fmt == "onnx":
        from runtime_tests.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, n_threads=threads)
    from runtime_tests.executorch_runner import ExecuTorchRunner

    return ExecuTorchRunner(path, threads=threads)


def _runtime_window(fmt: str, runner) -> int | None:
    """Most tokens one runner.logits call takes (None: unbounded)."""
    if fmt == "gguf":
        return int(runner.n_ctx)
    if fmt == "executorch":
        return int(runner.max_seq_len) - 1
    return None


def _runtime_info(fmt: str, path: Path, runner) -> dict:
    if fmt == "onnx":
        import onnx

        meta = {p.key: p.value for p in onnx.load(path / ONNX_MODEL_FILE, load_external_data=False).metadata_props}
        return {"runtime": "onnxruntime", "accuracy_level": int(meta.get("paretoq.accuracy_level", -1))}
    if fmt == "executorch":
        return {"runtime": "executorch", "max_seq_len": runner.max_seq_len}
    return {"runtime": "llama.cpp", "n_ctx": runner.n_ctx, "kv_cache": "f32"}


def _close(runner) -> None:
    close = getattr(runner, "close", None)
    if close is not None:
        close()


# ----------------------------------------------------------------------------------------------- validate
def _token_ids(ckpt, text: str | None, max_tokens: int) -> list[int]:
    from formats.gguf_cli import validation_token_ids

    if text and not Path(text).is_file():
        raise FileNotFoundError(f"--text {text} not found: give a UTF-8 text file (or leave it out for held-out "
                                "Wikipedia)")
    if ckpt.load_tokenizer() is None:
        raise ValidateError("the checkpoint has no tokenizer files: re-create it with its tokenizer")
    ids = validation_token_ids(ckpt, argparse.Namespace(validate=True, text=text, validate_tokens=max_tokens))
    if ids is None or len(ids) < 2:
        raise ValidateError(f"the validation text has {0 if ids is None else len(ids)} tokens: give a longer --text")
    return [int(t) for t in ids]


def validate_artifact(artifact: str | Path, checkpoint: str | Path, text: str | None = None, tasks: Sequence[str] = (),
                      limit: int | None = None, threads: int = 2, max_tokens: int = 512,
                      progress: bool = True) -> dict:
    """Validate an exported file against its checkpoint; returns the report (the module docstring's schema).

    ``text``: path of a text file for the logit metrics (default: the held-out Wikipedia documents the exporters
    validate on); ``tasks``: zero-shot task names or ["all"]; ``limit``: examples per task (seeded subset)."""
    import torch

    from paretoq_export.checkpoint import QuantizedCheckpoint
    from runtime_tests import zeroshot
    from runtime_tests.metrics import compare_logits

    start = time.perf_counter()
    fmt, path = detect_format(artifact)
    task_names = zeroshot.parse_tasks(tasks)
    if task_names:
        zeroshot.task_data_dir()  # missing task data: fail before any slow work
    ckpt = QuantizedCheckpoint.load(checkpoint)
    readback = _readback(fmt, path, ckpt)
    ids = _token_ids(ckpt, text, max_tokens)

    max_positions = int(ckpt.config.get("max_position_embeddings") or ZEROSHOT_MAX_LENGTH)
    zs_length = min(ZEROSHOT_MAX_LENGTH, max_positions)
    runner = _open_runner(fmt, path, threads, n_ctx=max(len(ids), zs_length if task_names else 0, 64))
    try:
        window = _runtime_window(fmt, runner)
        if window is not None and len(ids) > window:
            ids = ids[:window]  # ExecuTorch: the export's max_seq_len bounds one call
        reference = ckpt.build_reference_model()
        with torch.inference_mode():
            ref = reference(torch.tensor([ids])).logits[0].double().numpy()
        test = np.asarray(runner.logits(ids), dtype=np.float64)
        if test.shape != ref.shape:
            raise ValidateError(f"{path} returns logits {test.shape} where the checkpoint's model gives {ref.shape}: "
                                "the artifact was not exported from this checkpoint")
        m = compare_logits(ref[:-1], test[:-1], ids[1:])
        metrics = {"tokens": len(ids), "kl_mean": m["mean_kl"], "top1": m["top1_agreement"],
                   "ppl_reference": m["ppl_ref"], "ppl_artifact": m["ppl_test"], "ppl_ratio": m["ppl_ratio"],
                   "kl_max": m["max_kl"], "top1_clear_margin": m["top1_agreement_clear_margin"],
                   "max_abs_diff": m["max_abs_diff"]}
        metrics = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
        zs = zs_settings = None
        if task_names:
            tokenizer = ckpt.load_tokenizer()
            length = min(zs_length, window) if window is not None else zs_length
            device = "cuda" if torch.cuda.is_available() else "cpu"
            zs = {"reference": zeroshot.evaluate_tasks(zeroshot.torch_loglik_fn(reference, device, max_length=length),
                                                       tokenizer, task_names, limit, progress, desc="reference"),
                  "artifact": zeroshot.evaluate_tasks(zeroshot.runtime_loglik_fn(runner, max_length=length),
                                                      tokenizer, task_names, limit, progress, desc=fmt)}
            zs_settings = {"tasks": list(task_names), "limit": limit, "seed": 0, "max_length": length}
        info = _runtime_info(fmt, path, runner)
    finally:
        _close(runner)
    return {"format": fmt, "artifact": str(artifact), "artifact_bytes": artifact_bytes(fmt, path),
            "checkpoint": str(checkpoint), "readback": readback, "metrics": metrics, "zeroshot": zs,
            "zeroshot_settings": zs_settings, "runtime": {**info, "threads": threads},
            "seconds": time.perf_counter() - start}


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
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Atomic write (paretoq_export.atomic): a reader never sees half a file."""
    return write_text_atomic(path, json.dumps(report, indent=2) + "\n")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help=".gguf file, ONNX folder (model.onnx) or .pte file")
    parser.add_argument("--checkpoint", required=True, help="the paretoq checkpoint the artifact was exported from")
    parser.add_argument("--text", default=None,
                        help="text file for KL/top-1/PPL (default: the held-out Wikipedia documents)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens of --text to evaluate (default 512)")
    parser.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                        help="zero-shot tasks, or 'all': arc_easy arc_challenge boolq piqa siqa hellaswag obqa winogrande")
    parser.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (seeded subset)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="bar chart of the zero-shot accuracies (needs --tasks)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the runtime and the reference")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.plot and not args.tasks:
        raise ValidateError("--plot draws the zero-shot accuracies: add --tasks (e.g. --tasks all --limit 200)")
    torch.set_num_threads(args.threads)
    report = validate_artifact(args.artifact, args.checkpoint, text=args.text, tasks=args.tasks, limit=args.limit,
                               threads=args.threads, max_tokens=args.max_tokens)
    print(format_report(report))
    if args.json:
        print(f"report saved to {write_json(report, args.json)}")
    if args.plot:
        print(f"plot saved to {plot_zeroshot(report, args.plot)}")
    return 0
