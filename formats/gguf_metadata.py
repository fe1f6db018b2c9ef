"""GGUF metadata of a canonical checkpoint: the llama.cpp architecture and hyper-parameters from the model
description, Q/K row order for llama.cpp's rope layout, rope frequency factors, file names and the paretoq.* keys
that say what each tensor holds."""

from __future__ import annotations

import json
import logging
import math
import re
from typing import NamedTuple

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from formats.gguf_types import GGUFExportError, GGUFOptions, TensorRecord, choose_tensor_type
from paretoq_export.canonical.grids import format_bits
from paretoq_export.canonical.licenses import known_license
from paretoq_export.canonical.model_description import ModelDescription
from runtime_tests.llamacpp_types import LLAMA_CPP_ONLY_TYPES


log = logging.getLogger(__name__)

PARETOQ_VERSION = "0.1.0"


QUANTIZED_BY = "paretoq-export"


# llama.cpp architectures that run with interleaved rope pairs where transformers rotates halves: Q/K rows permuted
_INTERLEAVED_ROPE = {"llama"}

# families convert_hf_to_gguf writes under another llama.cpp architecture (Mistral is a Llama there)
_LLAMA_CPP_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


_FILE_TYPES = {
    T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, T.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
    T.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0, T.Q1_0: gguf.LlamaFileType.MOSTLY_Q1_0,
}


# llama.cpp's gemma3 loader takes every 6th layer as global unless the file carries the pattern (load_swa_pattern)
_GEMMA3_DEFAULT_SWA_PERIOD = 6


def describe_model(config: dict) -> tuple[ModelDescription, gguf.MODEL_ARCH, bool]:
    """The model, its llama.cpp architecture (named as the family) and whether Q/K rows are permuted."""
    model = ModelDescription.from_config(config, "GGUF", GGUFExportError)
    arch = _LLAMA_CPP_ARCH.get(model.model_type, model.model_type)
    if arch == "gemma3":
        # llama.cpp's gemma3 graph scales queries by 1/sqrt(head_dim) and has no attention-score softcapping
        if model.query_pre_attn_scalar is not None and model.query_pre_attn_scalar != model.head_dim:
            raise GGUFExportError(f"query_pre_attn_scalar {model.query_pre_attn_scalar:g} differs from head_dim "
                                  f"{model.head_dim}: llama.cpp's gemma3 scales attention by 1/sqrt(head_dim)")
        if model.attn_logit_softcapping is not None:
            raise GGUFExportError("attn_logit_softcapping is not supported by llama.cpp's gemma3 architecture")
    return model, gguf.MODEL_ARCH[arch.upper()], arch in _INTERLEAVED_ROPE


def _permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of convert_hf_to_gguf's LlamaModel.permute: per head, interleave the two rotary halves."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def row_permutation(hf_name: str, rows: int, model: ModelDescription, permute: bool) -> np.ndarray | None:
    if not permute:
        return None
    if ".q_proj." in hf_name:
        return _permutation(rows, model.n_heads)
    if ".k_proj." in hf_name:
        return _permutation(rows, model.n_kv_heads)
    return None


def _base_model(ckpt, options: GGUFOptions) -> str | None:
    return options.base_model or ckpt.recipe.get("base_model") or None


def _basename(ckpt, options: GGUFOptions) -> str:
    base = _base_model(ckpt, options) or str(ckpt.config.get("_name_or_path") or "") or "model"
    return base.rstrip("/").split("/")[-1] or "model"


def n_params(ckpt) -> int:
    total = sum(int(np.prod(q.shape)) for q in ckpt.quantized.values())
    return total + sum(int(t.numel()) for t in ckpt.tensors.values())


def default_filename(ckpt, options: GGUFOptions | None = None, file_type: str | None = None) -> str:
    """GGUF naming convention: <BaseName>-<SizeLabel>-<FineTune>-<Encoding>.gguf, e.g.
    SmolLM2-135M-Instruct-ParetoQ-2bit-Q2_K.gguf (the size label is left out when the name already has one)."""
    options = options or GGUFOptions()
    base = _basename(ckpt, options)
    size = gguf.size_label(n_params(ckpt), 0, 0, 0)
    if re.search(r"-\d+(\.\d+)?[KMBT]\b", base, re.I):
        size = None
    bits = sorted({q.grid.bits for q in ckpt.quantized.values()})
    finetune = "ParetoQ-" + "-".join(f"{format_bits(b)}bit" for b in bits) if bits else "ParetoQ"
    if file_type is None:
        file_type = _preferred_summary_type(ckpt, options)
    return gguf.naming_convention(None, base, finetune, None, size, file_type) + ".gguf"


def _preferred_summary_type(ckpt, options: GGUFOptions) -> str:
    counts: dict[str, int] = {}
    for key, q in ckpt.quantized.items():
        try:
            # codes and steps passed so group-wise steps finer than a block choose the type the writer will
            t = choose_tensor_type(key, q.grid, q.shape, options, codes=q.codes.numpy(),
                                   step=q.scale.numpy()).ggml_type.name
        except GGUFExportError:
            t = "F32"
        counts[t] = counts.get(t, 0) + int(np.prod(q.shape))
    return max(counts, key=counts.get) if counts else "F16"


def longrope_attention_factor(model: ModelDescription) -> float:
    """The cos/sin scale of longrope, as transformers computes it (_compute_longrope_parameters): the config's
    attention_factor, else sqrt(1 + log(factor) / log(original context)) with factor = max / original context."""
    rope, original = model.rope, int(model.original_max_positions or model.max_positions)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    factor = float(rope.get("factor") or model.max_positions / original)
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


def extra_tensors(model: ModelDescription, name_map) -> list[tuple[str, np.ndarray, T]]:
    rope = model.rope
    if model.model_type == "phi3" and model.rope_type == "longrope":
        # as Phi3MiniModel: llama.cpp divides the frequencies by the short factors while its context is within
        # the original one, by the long ones beyond, as transformers does by sequence length
        return [(gguf.TENSOR_NAMES[kind] + ".weight", np.array(rope[key], dtype=np.float32), T.F32)
                for kind, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                                  (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor"))]
    if model.model_type != "llama" or model.rope_type != "llama3":
        return []
    base, dim = rope.get("rope_theta", 10000.0), model.head_dim  # as convert_hf_to_gguf generate_extra_tensors
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [(name, np.array(out, dtype=np.float32), T.F32)]


def _warn_full_attention(model: ModelDescription, arch: str) -> None:
    """llama.cpp's llama, qwen2/3 and phi3 graphs attend over the whole context (phi3 turns its window off at
    load): the file equals the model on contexts up to the window, which is what convert_hf_to_gguf writes too
    (gemma3 windows its sliding layers itself)."""
    if arch != "gemma3" and model.sliding_window and model.sliding_window < model.max_positions:
        log.warning("%s has a %d-token sliding window; llama.cpp's %s attends over the whole context, so the GGUF "
                    "matches the model on contexts up to %d tokens (as convert_hf_to_gguf's files do)",
                    model.family.hf_class, model.sliding_window, arch, model.sliding_window)


class FileType(NamedTuple):
    """general.file_type: llama.cpp's id and name (gguf-py's LlamaFileType, or the installed llama.cpp's
    LLAMA_FTYPE_MOSTLY_<type> for a type gguf-py lacks)."""

    value: int
    name: str


def llama_file_type(records: list[TensorRecord]) -> FileType:
    weights: dict[str, int] = {}
    for r in records:
        if r.grid is not None:
            weights[r.ggml_type] = weights.get(r.ggml_type, 0) + int(np.prod(r.shape))
    if not weights:
        return FileType(int(gguf.LlamaFileType.MOSTLY_F16), gguf.LlamaFileType.MOSTLY_F16.name)
    most = max(weights, key=weights.get)
    if most in LLAMA_CPP_ONLY_TYPES and LLAMA_CPP_ONLY_TYPES[most].file_type is not None:
        return FileType(LLAMA_CPP_ONLY_TYPES[most].file_type, f"MOSTLY_{most}")
    file_type = _FILE_TYPES.get(T.__members__.get(most), gguf.LlamaFileType.GUESSED)
    return FileType(int(file_type), file_type.name)


def add_metadata(writer, ckpt, model: ModelDescription, options, records, file_type) -> str:
    """Every key but the tokenizer's; returns the general.name written."""
    base_model = _base_model(ckpt, options)
    basename = _basename(ckpt, options)
    bits = sorted({r.bits for r in records if r.bits is not None})
    writer.add_type(gguf.GGUFType.MODEL)
    name = options.name or f"{basename} ParetoQ {'/'.join(format_bits(b) for b in bits)}-bit"
    writer.add_name(name)
    writer.add_basename(basename)
    writer.add_size_label(gguf.size_label(n_params(ckpt), 0, 0, 0))
    writer.add_quantized_by(QUANTIZED_BY)
    writer.add_file_type(file_type.value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    license_ = options.license or ckpt.recipe.get("license")
    if not license_ and base_model:
        license_ = known_license(base_model)
    if license_:
        writer.add_license(license_)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model.split("/")[-1])
        if "/" in base_model:
            writer.add_base_model_organization(0, base_model.split("/")[0])
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")

    # hyper-parameters, as convert_hf_to_gguf's TextModel / LlamaModel / Qwen2Model / Qwen3Model write them
    writer.add_context_length(model.max_positions)
    writer.add_embedding_length(model.hidden)
    writer.add_block_count(model.n_layers)
    writer.add_feed_forward_length(model.intermediate)
    writer.add_head_count(model.n_heads)
    writer.add_head_count_kv(model.n_kv_heads)
    writer.add_layer_norm_rms_eps(model.rms_eps)
    rope = model.rope
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type, factor = model.rope_type, rope.get("factor")
    if rope_type == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type == "longrope" and writer.arch == "phi3":  # Phi-3 128k, Phi-4-mini: factors in extra_tensors
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(model))
    elif rope_type not in ("default", "llama3"):
        raise GGUFExportError(f"rope type {rope_type!r} is not supported by the GGUF exporter (default, linear, "
                              "yarn, llama3, longrope for Phi-3)")
    if model.local_rope_theta is not None:  # as convert_hf_to_gguf's TextModel: rope_parameters["sliding_attention"]
        writer.add_rope_freq_base_swa(float(model.local_rope_theta))
    if model.sliding_window and model.layer_types:
        writer.add_sliding_window(int(model.sliding_window))
        sliding = [model.is_sliding(i) for i in range(model.n_layers)]
        default = [i % _GEMMA3_DEFAULT_SWA_PERIOD < _GEMMA3_DEFAULT_SWA_PERIOD - 1 for i in range(model.n_layers)]
        if sliding != default:  # the converter writes none (its models follow the default); others need the layers
            writer.add_sliding_window_pattern(sliding)
    if model.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(model.final_logit_softcapping))
    if writer.arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3]:
        writer.add_add_space_prefix(False)  # as Gemma3Model.set_vocab: SentencePiece without a prepended space
    head_dim = model.head_dim
    arch = writer.arch
    if arch == "llama":
        writer.add_vocab_size(model.vocab)
        writer.add_rope_dimension_count(head_dim)
    if arch == "phi3":  # as Phi3MiniModel: rotary dims, pre-extension context, window (0: none)
        writer.add_rope_dimension_count(model.rotary_dim)
        writer.add_rope_scaling_orig_ctx_len(int(model.original_max_positions or model.max_positions))
        writer.add_sliding_window(int(model.sliding_window or 0))
    _warn_full_attention(model, arch)
    if model.explicit_head_dim and (model.qk_norm or head_dim != model.hidden // model.n_heads):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    # paretoq.* : what each tensor holds and how it was made
    writer.add_string("paretoq.version", PARETOQ_VERSION)
    writer.add_string("paretoq.recipe", json.dumps(ckpt.recipe, sort_keys=True, default=str))
    writer.add_string("paretoq.canonical_form", "w = s * (q - z), s fp16 per output row or per group of "
                      "paretoq.tensor_group_sizes columns, evaluated in float32")
    quant = [r for r in records if r.grid is not None]
    writer.add_array("paretoq.quantized_tensors", [r.gguf_name for r in quant] or [""])
    writer.add_array("paretoq.tensor_bits", [float(r.bits) for r in quant] or [0.0])
    writer.add_array("paretoq.tensor_grids", [r.grid for r in quant] or [""])
    writer.add_array("paretoq.tensor_types", [r.ggml_type for r in quant] or [""])
    writer.add_array("paretoq.tensor_group_sizes", [int(r.group_size or r.shape[-1]) for r in quant] or [0])
    writer.add_array("paretoq.fallbacks", [f"{r.gguf_name}: {r.reason}" for r in records if r.fallback] or [""])
    writer.add_array("paretoq.lossy_tensors", [r.gguf_name for r in records if r.lossy] or [""])
    writer.add_bool("paretoq.exact", not any(r.lossy for r in records))
    return name
