"""ONNX writer for the canonical checkpoint: a KV-cache decoder whose quantized linears are com.microsoft MatMulNBits.

    export_onnx(checkpoint, output_dir, OnnxOptions())   -> OnnxExportResult
    verify_onnx_readback(output_dir, checkpoint)         -> (formats.onnx_readback) every initializer decoded back

The output folder is what onnxruntime-genai loads: model.onnx (+ model.onnx.data above 2 GB), genai_config.json and
the tokenizer files. MatMulNBits initializers come straight from the integer codes and fp16 steps
(formats.onnx_nbits), never from float weights. ``accuracy_level`` 0 keeps float32 activations (the logits match
the PyTorch reference to ~1e-6); 4 lets onnxruntime quantize activations to int8 in the integer-zero-point
kernels (faster; logits move by ~1e-2). The folder is written to a temporary sibling, opened once in onnxruntime,
and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from formats.onnx_graph import MS_DOMAIN, DecoderGraph, GraphWriter, UnsupportedModelError, describe_model, rotary_tables
from formats.onnx_nbits import MIN_BLOCK, NBitsError, choose_block_size, choose_encoding, encode_weight
from paretoq_export.canonical.atomic import atomic_dir
from paretoq_export.canonical.checkpoint import open_checkpoint
from paretoq_export.canonical.grids import format_bits
from paretoq_export.canonical.model_description import ModelDescription

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 2**24  # protobuf's 2 GB limit, with room for the graph itself
PARETOQ_VERSION = "0.1.0"
EMBED = "model.embed_tokens.weight"


class OnnxExportError(ValueError):
    """An ONNX export the user can fix; the message is one line naming the problem and the fix."""


@dataclass
class OnnxOptions:
    accuracy_level: int = 0  # MatMulNBits accuracy_level: 0 float activations (exact), 4 int8 activations (fast)
    max_block_size: int = 128  # largest MatMulNBits block tried; the largest power of two dividing K is used
    seq2_bits: int = 2  # 2-bit SEQ container: 2 (float zero point 1.5) or 4 (twice the size, int8 kernels at level 4)
    overwrite: bool = False
    external_data: bool | None = None  # None: only when the tensors exceed protobuf's 2 GB
    check_runtime: bool = True  # open the folder in onnxruntime before renaming it into place
    progress: bool | None = None  # tqdm: None = only on a terminal


@dataclass
class LinearRecord:
    module: str
    grid: str | None  # None: a float MatMul
    bits: float | None
    container: str  # "int2-float-zp", "int4", "float" ...
    block_size: int | None
    shape: tuple[int, int]
    nbytes: int


@dataclass
class OnnxExportResult:
    path: Path  # the folder
    model_path: Path
    nbytes: int  # model.onnx (+ data), tokenizer and config excluded
    accuracy_level: int
    seconds: float
    records: list[LinearRecord] = field(default_factory=list)
    float_bytes: int = 0

    def container_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.container] = out.get(r.container, 0) + 1
        return out


def quantized_weight(ckpt, module: str):
    """The QuantizedTensor behind ``module``'s weight (a tied lm_head shares the embedding's), or None."""
    q = ckpt.quantized.get(f"{module}.weight")
    if q is None and module == "lm_head" and ckpt.tied:
        q = ckpt.quantized.get(EMBED)
    return q


def float_weight_name(ckpt, module: str) -> str:
    name = f"{module}.weight"
    return EMBED if module == "lm_head" and ckpt.tied and name not in ckpt.tensors else name


class _Linears:
    """The LinearEmitter: MatMulNBits from codes for quantized modules, MatMul on the float weight otherwise."""

    def __init__(self, ckpt, options: OnnxOptions, tensor):
        self.ckpt, self.options, self.tensor = ckpt, options, tensor
        self.records: list[LinearRecord] = []

    def __call__(self, g: GraphWriter, x: ir.Value, module: str) -> ir.Value:
        q = quantized_weight(self.ckpt, module)
        if q is None:
            name = float_weight_name(self.ckpt, module)
            values = self.tensor(name)
            if values is None:
                raise UnsupportedModelError(f"the checkpoint lacks {name}: not a standard model of this architecture")
            before = g.float_bytes
            weight = g.float_tensor(values, name)  # a tied table already stored adds no bytes
            self.records.append(LinearRecord(module, None, None, "float", None, tuple(values.shape),
                                             g.float_bytes - before))
            # onnxruntime folds this Transpose of an initializer at load; the file keeps the HF layout
            return g.op("MatMul", x, g.op("Transpose", weight, perm=[1, 0]), name=module)
        enc = choose_encoding(q.grid, self.options.accuracy_level, self.options.seq2_bits)
        w = encode_weight(q.codes.numpy(), q.scale.numpy(), q.grid, enc, self.options.max_block_size)
        inputs = [x, g.constant(w.packed, f"{module}.qweight"), g.constant(w.scales, f"{module}.scales")]
        if w.zero_points is not None:
            inputs.append(g.constant(w.zero_points, f"{module}.zero_points"))
        self.records.append(LinearRecord(module, q.grid.name, q.grid.bits, enc.kind, w.block_size, (w.n, w.k),
                                         w.nbytes))
        return g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, name=module,
                    **w.attributes(self.options.accuracy_level))


def _tensor_source(ckpt):
    """HF tensor name -> float32 array: float tensors as stored, a quantized embedding table dequantized (exact)."""

    def tensor(name: str) -> np.ndarray | None:
        if name in ckpt.tensors:
            return ckpt.tensors[name].float().numpy()
        if name == EMBED and name in ckpt.quantized:
            return ckpt.quantized[name].dequantize().numpy()
        return None

    return tensor


# ----------------------------------------------------------------------------------------------- naming, config
def _basename(ckpt) -> str:
    base = ckpt.recipe.get("base_model") or str(ckpt.config.get("_name_or_path") or "") or "model"
    return base.rstrip("/").split("/")[-1] or "model"


def default_dirname(ckpt, options: OnnxOptions | None = None) -> str:
    """e.g. SmolLM2-135M-Instruct-ParetoQ-2bit-onnx-acc0."""
    options = options or OnnxOptions()
    bits = sorted({q.grid.bits for q in ckpt.quantized.values()})
    tag = "ParetoQ-" + "-".join(f"{format_bits(b)}bit" for b in bits) if bits else "float"
    return f"{_basename(ckpt)}-{tag}-onnx-acc{options.accuracy_level}"


def genai_config(ckpt, spec: ModelDescription) -> dict:
    """onnxruntime-genai's genai_config.json for this graph (names as formats.onnx_graph writes them). The graph
    concatenates past and new keys, so past and present do not share a buffer."""
    cfg = ckpt.config
    eos = cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": cfg.get("bos_token_id"),
            "context_length": spec.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": spec.model_type,
            "vocab_size": spec.vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": spec.max_positions, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def _metadata(ckpt, options: OnnxOptions, records: list[LinearRecord]) -> dict[str, str]:
    quant = [r for r in records if r.grid is not None]
    return {
        "paretoq.version": PARETOQ_VERSION,
        "paretoq.recipe": json.dumps(ckpt.recipe, sort_keys=True, default=str),
        "paretoq.canonical_form": "w = s * (q - z), s fp16 per output row; MatMulNBits scale = s / mul, "
                                  "code = mul * q + add, zero point = add + mul * z (exact)",
        "paretoq.accuracy_level": str(options.accuracy_level),
        "paretoq.quantized_linears": json.dumps(
            {r.module: {"grid": r.grid, "bits": r.bits, "container": r.container, "block_size": r.block_size}
             for r in quant}, sort_keys=True),
    }


# ----------------------------------------------------------------------------------------------- export
def export_onnx(checkpoint, output: str | os.PathLike | None = None,
                options: OnnxOptions | None = None) -> OnnxExportResult:
    """Write the checkpoint as an onnxruntime(-genai) folder, atomically. ``output`` None: a default-named folder
    next to a checkpoint given by path (else in the current directory)."""
    options = options or OnnxOptions()
    t0 = time.perf_counter()
    ckpt, ckpt_path = open_checkpoint(checkpoint)
    spec = describe_model(ckpt.config)
    choose_block_size(MIN_BLOCK, options.max_block_size)  # fail on options before any work
    for q in ckpt.quantized.values():
        choose_encoding(q.grid, options.accuracy_level, options.seq2_bits)
    extra = set(ckpt.quantized) - {f"{m}.weight" for m in _linear_modules(spec)} - {EMBED}
    if extra:
        raise UnsupportedModelError(f"quantized tensors {sorted(extra)[:3]} have no place in the {spec.model_type} "
                                    "graph: unsupported variant")
    if output is None:
        output = (ckpt_path.parent if ckpt_path is not None else Path.cwd()) / default_dirname(ckpt, options)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not options.overwrite:
        raise OnnxExportError(f"output {output} exists and is not empty: pass --overwrite or choose another -o")

    from tqdm.auto import tqdm

    disable = None if options.progress is None else not options.progress
    tensor = _tensor_source(ckpt)
    linears = _Linears(ckpt, options, tensor)
    cos, sin = rotary_tables(ckpt.config, spec)
    try:
        builder = DecoderGraph(spec, cos, sin, tensor, linears, progress=lambda it, **kw: tqdm(it, disable=disable,
                                                                                                 **kw))
        model = builder.build()
    except NBitsError as exc:
        raise OnnxExportError(str(exc)) from None
    model.metadata_props.update(_metadata(ckpt, options, linears.records))

    with atomic_dir(output) as tmp:
        _write_folder(tmp, model, ckpt, spec, options)
        if options.check_runtime:
            check_runtime(tmp / MODEL_FILE)  # an op the installed runtime lacks: error, nothing left behind
    model_path = output / MODEL_FILE
    nbytes = model_path.stat().st_size + ((output / DATA_FILE).stat().st_size if (output / DATA_FILE).exists() else 0)
    return OnnxExportResult(output, model_path, nbytes, options.accuracy_level, time.perf_counter() - t0,
                            linears.records, builder.g.float_bytes)


def _linear_modules(spec: ModelDescription) -> list[str]:
    names = ["lm_head"]
    for i in range(spec.n_layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def _write_folder(folder: Path, model: ir.Model, ckpt, spec: ModelDescription, options: OnnxOptions) -> None:
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = options.external_data if options.external_data is not None else total > EXTERNAL_DATA_BYTES
    ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE if external else None)
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(ckpt, spec), indent=2) + "\n")
    for name, data in ckpt.tokenizer_files.items():
        (folder / name).write_bytes(data)


def check_runtime(model_path: str | os.PathLike) -> None:
    """Open the model in the installed onnxruntime; an op or opset it lacks becomes a one-line OnnxExportError."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only loading is checked here
    try:
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private exception types
        first = " ".join(str(exc).split())[:300]
        raise OnnxExportError(f"onnxruntime {ort.__version__} cannot run the exported graph ({first}): upgrade "
                              "onnxruntime (>= 1.22 has the opset-23 Attention/RotaryEmbedding/RMSNormalization "
                              "and MatMulNBits kernels used here)") from None
