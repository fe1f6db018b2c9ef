"""GGUF writer for the canonical checkpoint: exact block types chosen per tensor, llama.cpp-ready metadata.

    export_gguf(checkpoint, output, GGUFOptions())   -> GGUFExportResult

The jobs around the writer have a module each: gguf_types (which ggml type holds each tensor), gguf_metadata
(architecture, hyper-parameters, paretoq.* keys), gguf_vocab (the tokenizer), gguf_blocks (exact block encoders),
gguf_readback (read-back and validation), gguf_format (the format as the commands see it).

Quantized weights are encoded by formats.gguf_blocks from the integer codes and fp16 steps (DESIGN.md section 3),
never re-quantized from floats. A tensor whose columns do not fit the preferred block falls back to the smallest
exact container (Q4_0 for 576-wide rows; Q2_0 first for ternary and binary rows with --ternary-fallback Q2_0),
recorded in the log and in ``paretoq.fallbacks``. Group-wise steps (QuantizedTensor.group_size G) go where a block
holds one step: Q4_0 / Q8_0 for any G (the group's step in each of its 32-blocks), Q2_0 for G = 64, 128, 256, the
256-block types (TQ1_0, TQ2_0, Q2_K, Q3_K) for G = 256; finer groups fall back to Q4_0.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from formats.gguf_blocks import GGMLType, dequantize_codes, encoder_for
from formats.gguf_metadata import (
    add_metadata, default_filename, describe_model, extra_tensors, llama_file_type, row_permutation,
)
from formats.gguf_types import (  # noqa: F401 - GGUFExportError, GGUFOptions: the writer's API
    GGUFExportError, GGUFOptions, TensorRecord, choose_tensor_type, parse_tensor_types, parse_type, ternary_containers,
)
from formats.gguf_vocab import add_tokenizer, check_name_loads_in_llama_cpp
from paretoq_export.canonical.atomic import atomic_file
from paretoq_export.canonical.checkpoint import open_checkpoint
from paretoq_export.canonical.model_description import ModelDescription
from runtime_tests.llamacpp_types import LlamaCppOnlyType

log = logging.getLogger(__name__)


@dataclass
class GGUFExportResult:
    path: Path
    tensor_types: dict[str, str]  # gguf tensor name -> ggml type name
    nbytes: int
    fallbacks: list[str]
    lossy: list[str]
    file_type: str
    seconds: float
    records: list[TensorRecord] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensor_types.values():
            out[t] = out.get(t, 0) + 1
        return out


def export_gguf(checkpoint, output: str | os.PathLike | None = None,
                options: GGUFOptions | None = None) -> GGUFExportResult:
    """Write the checkpoint as GGUF (atomically). ``output`` None or a directory: default file name there
    (next to a checkpoint given by path, else the current directory)."""
    options = options or GGUFOptions()
    t0 = time.perf_counter()
    ckpt, ckpt_path = open_checkpoint(checkpoint)
    model, arch, permute = describe_model(ckpt.config)
    parse_tensor_types(options.tensor_types)  # fail early on a malformed rule
    for value, what in ((options.embedding_type, "--embedding-type"), (options.output_type, "--output-type")):
        if value:
            parse_type(value, what)
    ternary_containers(options)

    if output is None:
        out_dir = ckpt_path.parent if ckpt_path is not None else Path.cwd()
        output = out_dir / default_filename(ckpt, options)
    output = Path(output)
    if output.is_dir():
        output = output / default_filename(ckpt, options)
    if output.exists() and not options.overwrite:
        raise GGUFExportError(f"output {output} exists: pass --overwrite or choose another -o")
    output.parent.mkdir(parents=True, exist_ok=True)

    name_map = gguf.get_tensor_name_map(arch, model.n_layers)
    items = tensor_items(ckpt)
    records: list[TensorRecord] = []
    payloads: list[tuple[str, np.ndarray, GGMLType]] = []

    from tqdm.auto import tqdm

    disable = None if options.progress is None else not options.progress
    for hf_name in tqdm(items, desc="gguf tensors", unit="tensor", disable=disable):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"tensor {hf_name} has no GGUF name for {arch.name.lower()}: unsupported variant")
        rec, data, ggml_type = _encode_tensor(ckpt, hf_name, gguf_name, model, permute, options)
        records.append(rec)
        payloads.append((gguf_name, data, ggml_type))
        if rec.fallback:
            log.debug("%s: %s", gguf_name, rec.reason)
        if rec.lossy:
            log.warning("%s: lossy %s (%s)", gguf_name, rec.ggml_type, rec.reason)

    for extra in extra_tensors(model, name_map):
        payloads.append(extra)
        records.append(TensorRecord("(generated)", extra[0], "F32", tuple(extra[1].shape), extra[1].nbytes,
                                    None, None, "rope frequency factors"))

    file_type = llama_file_type(records)
    with atomic_file(output) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        name = add_metadata(writer, ckpt, model, options, records, file_type)
        check_name_loads_in_llama_cpp(name, add_tokenizer(writer, ckpt, model.vocab))
        for gguf_name, data, ggml_type in payloads:
            if ggml_type in (T.F32, T.F16):
                writer.add_tensor(gguf_name, data)
            elif isinstance(ggml_type, LlamaCppOnlyType):
                # gguf-py has no GGML_QUANT_SIZES entry to turn a uint8 byte shape into the element shape: give it
                # the element shape, the installed llama.cpp's type id, and the same bytes as int8 (written as is)
                rows, row_bytes = data.shape
                writer.add_tensor(gguf_name, data.view(np.int8),
                                  raw_shape=(rows, row_bytes // ggml_type.type_size * ggml_type.block_size),
                                  raw_dtype=ggml_type.value)
            else:
                writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    fallbacks = [f"{r.gguf_name}: {r.reason}" for r in records if r.fallback]
    reasons: dict[str, int] = {}
    for r in records:
        if r.fallback:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    for reason, count in reasons.items():
        log.warning("%d tensors: %s (exact; recorded in paretoq.fallbacks)", count, reason)
    return GGUFExportResult(
        path=output, tensor_types={r.gguf_name: r.ggml_type for r in records}, nbytes=output.stat().st_size,
        fallbacks=fallbacks, lossy=[r.gguf_name for r in records if r.lossy], file_type=file_type.name,
        seconds=time.perf_counter() - t0, records=records,
    )


def tensor_items(ckpt) -> list[str]:
    names = list(ckpt.tensors) + list(ckpt.quantized)
    if ckpt.tied:
        names = [n for n in names if n != "lm_head.weight"]  # llama.cpp reuses token_embd without output.weight

    def key(n: str):
        m = re.search(r"\.layers\.(\d+)\.", n)
        return (0 if "embed_tokens" in n else 1 if m else 2, int(m.group(1)) if m else 0, n)

    return sorted(names, key=key)


def _encode_tensor(ckpt, hf_name, gguf_name, model: ModelDescription, permute,
                   options) -> tuple[TensorRecord, np.ndarray, GGMLType]:
    q = ckpt.quantized.get(hf_name)
    if q is not None:
        codes = q.codes.numpy()
        step = q.scale.numpy().astype(np.float16)
        perm = row_permutation(hf_name, codes.shape[0], model, permute)
        if perm is not None:  # rows move with their steps, so exactness is untouched
            codes, step = codes[perm], step[perm]
        choice = choose_tensor_type(gguf_name, q.grid, codes.shape, options, hf_name=hf_name, codes=codes, step=step)
        if choice.lossy:
            data = gguf.quants.quantize(dequantize_codes(codes, step, q.grid), choice.ggml_type)
        else:
            data = encoder_for(choice.ggml_type).encode(codes, step, q.grid)
            if choice.ggml_type in (T.F32, T.F16):  # the writer takes float arrays for float types
                data = data.view(np.float32 if choice.ggml_type == T.F32 else np.float16)
        rec = TensorRecord(hf_name, gguf_name, choice.ggml_type.name, tuple(codes.shape), data.nbytes, q.grid.name,
                           q.grid.bits, choice.reason, choice.fallback, choice.lossy, q.group_size)
        return rec, data, choice.ggml_type
    tensor = ckpt.tensors[hf_name]
    values = model.stored_float_values(hf_name, tensor.float().numpy())
    perm = row_permutation(hf_name, values.shape[0], model, permute)
    if perm is not None:
        values = values[perm]
    choice = choose_tensor_type(gguf_name, None, values.shape, options, hf_name=hf_name, values=values)
    if choice.ggml_type == T.F32:
        data = np.ascontiguousarray(values, dtype=np.float32)
    elif choice.ggml_type == T.F16:
        data = values.astype(np.float16)
    else:
        data = gguf.quants.quantize(values, choice.ggml_type)
    rec = TensorRecord(hf_name, gguf_name, choice.ggml_type.name, tuple(values.shape), data.nbytes, None, None,
                       choice.reason, choice.fallback, choice.lossy)
    return rec, data, choice.ggml_type
