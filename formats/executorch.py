"""ExecuTorch writer for the canonical checkpoint: a .pte with a static KV cache, linears delegated to XNNPACK.

    export_executorch(checkpoint, output, ExecuTorchOptions())   -> ExecuTorchExportResult
    check_kv_decode(runner, token_ids, prefill)                 -> KV-cached decode vs full recompute (the
                                                                   format's extra check in formats.validation)

Quantized linears are built from the checkpoint's integer codes and fp16 steps (formats.executorch_weights), never
re-quantized from floats: on x86 every grid sits exactly in an int4 per-channel container that XNNPACK runs with
int8 dynamic activations (8da4w); ``target="arm64"`` keeps the true 1-3 bit widths for torchao's lowbit kernels,
which exist only in Arm64 builds of torchao and ExecuTorch (see ExecuTorchOptions.target). The program, its
metadata and KV cache follow formats.executorch_program; the tokenizer file is written beside the .pte.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from formats.executorch_program import (
    LINEAR_OPS, QUANT_OPS, Delegation, eos_ids, export_program, lower_to_executorch, metadata,
)
from formats.executorch_weights import (
    EMBED_KEY, PTQ_SCHEMES, TARGETS, ContainerError, build_eager_model, check_groups, torchao_8da4w,
    verify_eager_weights,
)
from paretoq_export.canonical.atomic import write_bytes_atomic
from paretoq_export.canonical.checkpoint import open_checkpoint
from paretoq_export.canonical.grids import format_bits
from paretoq_export.canonical.model_description import LENGTH_DEPENDENT_ROPE, ModelDescription

log = logging.getLogger(__name__)

EMBEDDING_BITS = (4, 8)
DEFAULT_MAX_SEQ_LEN = 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what ExecuTorch's runner loads (HF json, SentencePiece)


class ExecuTorchExportError(ValueError):
    """An ExecuTorch export the user can fix; the message is one line naming the problem and the fix."""


@dataclass
class ExecuTorchOptions:
    # "x86": every grid in int4 (XNNPACK 8da4w), runs anywhere; XNNPACK stores int4 per-row scales as bf16.
    # "x86-int8": the same integers in int8 (XNNPACK 8da8w, fp32 scales): bit-exact, 2x the linear bytes. "arm64": true 1/1.58/2/3-bit weights through
    # torchao's lowbit kernels; the export needs torchao with those kernels (Arm64 wheels) and the .pte runs only
    # on ExecuTorch built with them (EXECUTORCH_BUILD_KERNELS_TORCHAO=ON), never on x86.
    target: str = "x86"
    max_seq_len: int | None = None  # KV cache length, prompt + generated; None: 1024 or max_position_embeddings
    embedding_bits: int | None = None  # 4 or 8: per-row symmetric embedding table (lossy, float table rounded)
    overwrite: bool = False
    write_tokenizer: bool = True
    progress: bool | None = None  # tqdm: None = only on a terminal
    # "8da4w": torchao's own post-training quantization of a float checkpoint's linears instead of codes (the
    # runtime's baseline that formats.baselines measures QAT against; formats.executorch_weights.torchao_8da4w)
    ptq: str | None = None


@dataclass
class ExecuTorchExportResult:
    path: Path
    nbytes: int
    tokenizer_path: Path | None
    target: str
    max_seq_len: int
    delegation: Delegation
    weights: dict  # verify_eager_weights: every quantized weight equals the checkpoint's
    seconds: float
    metadata: dict = field(default_factory=dict)
    ptq_group_size: int | None = None  # options.ptq: the weight group size it used

    def linears_delegated(self) -> bool:
        """Every linear (and every torchao quant op of the 8-bit activations) runs inside an XNNPACK delegate."""
        return all(self.delegation.count(op)[1] == 0 for op in LINEAR_OPS + QUANT_OPS)


def uniform_window(model: ModelDescription) -> int | None:
    """The sliding window every layer applies (Mistral, Phi-3), which bounds the cache; None where there is none or
    where layer_types window some layers only (Gemma 3: those layers get an explicit window mask)."""
    return None if model.layer_types else model.sliding_window


def _check_options(ckpt, options: ExecuTorchOptions) -> None:
    model = ModelDescription.from_config(ckpt.config, "ExecuTorch", ExecuTorchExportError)
    if model.rope_type in LENGTH_DEPENDENT_ROPE:  # its frequencies would be traced for one length only
        raise ExecuTorchExportError(f"rope type {model.rope_type!r} is not supported by the ExecuTorch exporter "
                                    "(its frequencies change with the sequence length)")
    if uniform_window(model) and int(options.max_seq_len) > model.sliding_window:
        # ExecuTorch's custom_sdpa attends causally over the whole cache: within a cache no longer than the
        # window, that is exactly the sliding-window attention (per-layer windows get an explicit mask instead)
        raise ExecuTorchExportError(f"--max-seq-len {options.max_seq_len} exceeds the model's {model.sliding_window}"
                                    f"-token sliding window, which ExecuTorch's attention kernel does not apply: "
                                    f"choose --max-seq-len {model.sliding_window} or less")
    if options.target not in TARGETS:
        raise ExecuTorchExportError(f"unknown --target {options.target!r}: use one of {', '.join(TARGETS)}")
    limit = _max_positions(ckpt)
    if not 2 <= int(options.max_seq_len) <= limit:
        raise ExecuTorchExportError(f"--max-seq-len {options.max_seq_len} is outside 2..{limit} (the model's "
                                    "max_position_embeddings): choose a length in that range")
    for key, q in ckpt.quantized.items():  # group sizes the target cannot hold: before any weight is built
        try:
            check_groups(key, q.group_size, q.shape[1], options.target, is_linear=key != EMBED_KEY)
        except ContainerError as exc:
            raise ExecuTorchExportError(str(exc)) from None
    if options.embedding_bits is not None and options.embedding_bits not in EMBEDDING_BITS:
        raise ExecuTorchExportError(f"--embedding-bits {options.embedding_bits} is not supported: use 4 or 8 "
                                    "(or leave it out for a float32 table)")
    if options.ptq is not None:
        if options.ptq not in PTQ_SCHEMES:
            raise ExecuTorchExportError(f"unknown post-training scheme {options.ptq!r}: use one of "
                                        f"{', '.join(PTQ_SCHEMES)}")
        if ckpt.quantized or options.target != "x86" or options.embedding_bits:
            raise ExecuTorchExportError(f"{options.ptq} quantizes a float checkpoint's linears for XNNPACK on x86: "
                                        "give the float model's checkpoint, --target x86 and no --embedding-bits")
    if options.target == "arm64":
        from torchao.quantization.quantize_.workflows.intx.intx_opaque_tensor import _is_kernel_library_loaded

        if not _is_kernel_library_loaded():
            raise ExecuTorchExportError(
                "--target arm64 needs torchao's lowbit kernels (torch.ops.torchao._pack_8bit_act_*bit_weight), which "
                "only Arm64 builds of torchao ship: run this export on an Arm64 machine, or use --target x86")


def _max_positions(ckpt) -> int:
    return int(ckpt.config.get("max_position_embeddings") or 1 << 20)


def default_filename(ckpt, options: ExecuTorchOptions | None = None) -> str:
    """<BaseName>-ParetoQ-<bits>bit-<target>.pte, e.g. SmolLM2-135M-Instruct-ParetoQ-2bit-xnnpack.pte."""
    options = options or ExecuTorchOptions()
    base = str(ckpt.recipe.get("base_model") or ckpt.config.get("_name_or_path") or "model").rstrip("/")
    base = base.split("/")[-1] or "model"
    bits = sorted({q.grid.bits for q in ckpt.quantized.values()})
    tag = "ParetoQ-" + "-".join(f"{format_bits(b)}bit" for b in bits) if bits else options.ptq or "fp32"
    kind = {"x86": "xnnpack", "x86-int8": "xnnpack-int8"}.get(options.target, "arm64-lowbit")
    emb = f"-emb{options.embedding_bits}" if options.embedding_bits else ""
    return f"{base}-{tag}{emb}-{kind}.pte"


def _tokenizer_file(ckpt) -> tuple[str, bytes] | None:
    for name in TOKENIZER_FILES:
        if name in ckpt.tokenizer_files:
            return name, ckpt.tokenizer_files[name]
    return None


def _resolve_output(ckpt, ckpt_path: Path | None, output, options: ExecuTorchOptions) -> tuple[Path, Path | None]:
    if output is None:
        output = (ckpt_path.parent if ckpt_path is not None else Path.cwd()) / default_filename(ckpt, options)
    output = Path(output)
    if output.is_dir():
        output = output / default_filename(ckpt, options)
    if output.suffix != ".pte":
        raise ExecuTorchExportError(f"output {output} does not end in .pte: name the file model.pte (or give a "
                                    "directory)")
    if output.exists() and not options.overwrite:
        raise ExecuTorchExportError(f"output {output} exists: pass --overwrite or choose another -o")
    tok = _tokenizer_file(ckpt) if options.write_tokenizer else None
    tok_path = output.parent / tok[0] if tok else None
    if tok_path is not None and tok_path.exists() and not options.overwrite and tok_path.read_bytes() != tok[1]:
        raise ExecuTorchExportError(f"{tok_path} exists and holds another tokenizer: pass --overwrite or write the "
                                    ".pte to another directory")
    return output, tok_path


def export_executorch(checkpoint, output: str | os.PathLike | None = None,
                      options: ExecuTorchOptions | None = None) -> ExecuTorchExportResult:
    """Write the checkpoint as an ExecuTorch .pte (atomically) and its tokenizer beside it.

    ``output`` None or a directory: default file name there (next to a checkpoint given by path, else the
    current directory). Every check that can fail runs before anything is written."""
    from tqdm.auto import tqdm

    options = options or ExecuTorchOptions()
    t0 = time.perf_counter()
    ckpt, ckpt_path = open_checkpoint(checkpoint)
    if options.max_seq_len is None:
        window = uniform_window(ModelDescription.from_config(ckpt.config, "ExecuTorch", ExecuTorchExportError))
        options = dataclasses.replace(options, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, _max_positions(ckpt),
                                                               window or DEFAULT_MAX_SEQ_LEN))
    _check_options(ckpt, options)
    output, tok_path = _resolve_output(ckpt, ckpt_path, output, options)

    disable = None if options.progress is None else not options.progress
    stages = tqdm(total=4, desc="executorch", unit="stage", disable=disable)
    try:
        stages.set_postfix_str("quantized weights")
        try:
            model = build_eager_model(ckpt, options.target, options.embedding_bits, progress=options.progress)
            weights = verify_eager_weights(model, ckpt)
            group = torchao_8da4w(model) if options.ptq else None
        except ContainerError as exc:
            raise ExecuTorchExportError(str(exc)) from exc
        if options.target == "arm64":
            _pack_lowbit(model)
        stages.update()
        stages.set_postfix_str("torch.export")
        tokenizer_eos = _generation_eos(ckpt)
        meta = metadata(ckpt.config, int(options.max_seq_len), eos_ids(ckpt.config, tokenizer_eos))
        program = export_program(model, int(options.max_seq_len))
        del model
        stages.update()
        stages.set_postfix_str("XNNPACK lowering")
        quantized_embedding = bool(options.embedding_bits) or "model.embed_tokens.weight" in ckpt.quantized
        manager, delegation = lower_to_executorch(program, meta, quantized_embedding)
        stages.update()
        stages.set_postfix_str("write")
        output.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(output, manager.buffer)
        if tok_path is not None:
            write_bytes_atomic(tok_path, _tokenizer_file(ckpt)[1])
        stages.update()
    finally:
        stages.close()
    if tok_path is None:
        log.warning("the checkpoint has no tokenizer.json / tokenizer.model: none written beside %s", output)
    result = ExecuTorchExportResult(output, output.stat().st_size, tok_path, options.target, int(options.max_seq_len),
                                    delegation, weights, time.perf_counter() - t0, meta, group)
    if options.target != "arm64" and not result.linears_delegated():
        log.warning("some linears were not delegated to XNNPACK: %s", {
            op: delegation.count(op) for op in LINEAR_OPS + QUANT_OPS if delegation.count(op)[1]})
    return result


def _generation_eos(ckpt):
    """EOS ids: the tokenizer's eos token where the config has none (GGUF-imported models)."""
    if ckpt.config.get("eos_token_id") is not None:
        return None
    tok = ckpt.load_tokenizer()
    return None if tok is None or tok.eos_token_id is None else [tok.eos_token_id]


def _pack_lowbit(model) -> None:
    """arm64: every IntxUnpackedToInt8Tensor linear weight -> torchao's packed lowbit layout (IntxOpaqueTensor),
    which lowers to torchao::_linear_8bit_act_{1..4}bit_weight (Arm64 kernels)."""
    from torch import nn
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_opaque_tensor import IntxOpaqueTensor

    for module in model.modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, IntxUnpackedToInt8Tensor):
            packed = IntxOpaqueTensor.from_intx_unpacked_to_int8_tensor(module.weight, bias=module.bias)
            module.weight = nn.Parameter(packed, requires_grad=False)
            module.bias = None  # packed with the weight


# ----------------------------------------------------------------------------------------------- validation
def check_kv_decode(runner, token_ids: Sequence[int], prefill: int, new_tokens: int = 16,
                    reference: np.ndarray | None = None) -> dict:
    """KV-cached decode vs full recompute in the same runtime.

    1. teacher-forced: prefill ``prefill`` tokens, then feed the rest one at a time through the cache; compare each
       position's logits with one full-sequence prefill (max |diff|, argmax agreement) and, given the reference
       logits, both paths with the PyTorch reference on those positions (KL, top-1, PPL ratio).
    2. greedy: generate ``new_tokens`` with the cache, then recompute prompt + generated without it (one prefill
       from position 0): every generated token should be the recomputed argmax at its position.

    With int8 dynamic activations XNNPACK's one-row (decode) and many-row (prefill) kernels round differently
    (on SmolLM2 2-bit their logits differ by up to ~2 with the same KL to the reference, ~8e-3), so near-tied tokens
    can flip between the two: judge a quantized .pte by ``decode_vs_reference``; a float .pte, whose kernels agree,
    matches to ~1e-4 (tests/test_executorch.py)."""
    from runtime_tests.metrics import compare_logits

    ids = [int(t) for t in token_ids]
    full = runner.logits(ids)
    stepped = np.concatenate([runner.forward(ids[:prefill], 0)] +
                             [runner.forward([t], i) for i, t in enumerate(ids[prefill:], start=prefill)])
    prompt = ids[:prefill]
    generated = runner.generate(prompt, new_tokens)
    recomputed = runner.logits(prompt + generated)
    redo = recomputed[len(prompt) - 1:len(prompt) - 1 + len(generated)].argmax(axis=-1).tolist()
    out = {
        "prefill": prefill,
        "teacher_forced_positions": len(ids) - prefill,
        "teacher_forced_max_abs_diff": float(np.abs(stepped[prefill:] - full[prefill:]).max()),
        "teacher_forced_argmax_agreement": float((stepped.argmax(-1) == full.argmax(-1))[prefill:].mean()),
        "greedy_tokens": generated,
        "greedy_recomputed": redo,
        "greedy_equal": generated == redo,
    }
    if reference is not None and len(ids) - prefill >= 2:
        targets = np.asarray(ids[prefill + 1:])
        out["decode_vs_reference"] = compare_logits(reference[prefill:-1], stepped[prefill:-1], targets)
        out["prefill_vs_reference"] = compare_logits(reference[prefill:-1], full[prefill:-1], targets)
    return out
