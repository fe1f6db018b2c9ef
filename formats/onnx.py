"""ONNX writer for the canonical checkpoint: a KV-cache decoder whose quantized linears are com.microsoft MatMulNBits.

    export_onnx(checkpoint, output_dir, OnnxOptions())   -> OnnxExportResult
    verify_onnx_readback(output_dir, checkpoint)         -> (formats.onnx_readback) every initializer decoded back

The output folder is what onnxruntime-genai loads: model.onnx (+ model.onnx.data above 2 GB), genai_config.json and
the tokenizer files. MatMulNBits initializers come straight from the integer codes and fp16 steps
(formats.onnx_nbits), never from float weights; a quantized embedding table is a com.microsoft GatherBlockQuantized
over the same packed codes and scales as the tied lm_head's MatMulNBits (one copy in the file). By default every
grid takes the exact container onnxruntime runs fastest and ``accuracy_level`` 4 (onnxruntime quantizes
activations to int8; logits move by ~1e-2); ``accuracy_level`` 0 keeps float32 activations (logits match the
PyTorch reference to ~1e-6); ``smallest`` stores 2-bit SEQ as bits=2 with a float zero point (fewest bytes, a float
kernel). The folder is written to a temporary sibling, opened once in onnxruntime, and only then renamed into
place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from formats.onnx_graph import MS_DOMAIN, DecoderGraph, GraphWriter, UnsupportedModelError, describe_model, rotary_tables
from formats.onnx_nbits import (
    MIN_BLOCK, NBitsError, NBitsWeight, choose_block_size, choose_encoding, encode_weight,
)
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

log = logging.getLogger(__name__)


class OnnxExportError(ValueError):
    """An ONNX export the user can fix; the message is one line naming the problem and the fix."""


@dataclass
class OnnxOptions:
    accuracy_level: int = 4  # MatMulNBits accuracy_level: 4 int8 activations (fast), 0 float activations (exact)
    max_block_size: int = 128  # largest MatMulNBits block tried; the largest power of two dividing K (or G) is used
    smallest: bool = False  # 2-bit SEQ (and level-0 ternary/binary) as bits=2 with a float zero point: fewest bytes
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
    nbytes: int  # bytes this module added to the file (0: it shares another's initializers)
    why: str = ""  # why this container (the export log says it)
    op: str = "MatMulNBits"  # or "GatherBlockQuantized" (the embedding lookup), "MatMul" (float)


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
    """The LinearEmitter and the embedding lookup: MatMulNBits from codes for quantized modules, MatMul on the float
    weight otherwise; a quantized embedding table as GatherBlockQuantized over the packed initializers its tied
    lm_head's MatMulNBits reads (one copy of the codes and scales)."""

    def __init__(self, ckpt, options: OnnxOptions, tensor):
        self.ckpt, self.options, self.tensor = ckpt, options, tensor
        self.records: list[LinearRecord] = []
        self._packed: dict[str, tuple[NBitsWeight, list[ir.Value]]] = {}  # checkpoint key -> initializers

    def _nbits(self, g: GraphWriter, key: str, q) -> tuple[NBitsWeight, list[ir.Value], int]:
        """The MatMulNBits initializers of quantized tensor ``key`` (made once) and the bytes they added now."""
        if key in self._packed:
            return *self._packed[key], 0
        enc = choose_encoding(q.grid, self.options.accuracy_level, self.options.smallest)
        w = encode_weight(q.codes.numpy(), q.scale.numpy(), q.grid, enc, self.options.max_block_size)
        base = key.removesuffix(".weight")
        values = [g.constant(w.packed, f"{base}.qweight"), g.constant(w.scales, f"{base}.scales")]
        if w.zero_points is not None:
            values.append(g.constant(w.zero_points, f"{base}.zero_points"))
        self._packed[key] = (w, values)
        return w, values, w.nbytes

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
                                             g.float_bytes - before, op="MatMul"))
            # onnxruntime folds this Transpose of an initializer at load; the file keeps the HF layout
            return g.op("MatMul", x, g.op("Transpose", weight, perm=[1, 0]), name=module)
        key = f"{module}.weight" if f"{module}.weight" in self.ckpt.quantized else EMBED
        w, inputs, added = self._nbits(g, key, q)
        self.records.append(LinearRecord(module, q.grid.name, q.grid.bits, w.encoding.kind, w.block_size, (w.n, w.k),
                                         added, w.encoding.why))
        return g.op("MatMulNBits", x, *inputs, domain=MS_DOMAIN, name=module,
                    **w.attributes(self.options.accuracy_level))

    def embedding(self, g: GraphWriter, input_ids: ir.Value) -> ir.Value | None:
        """GatherBlockQuantized over the quantized table (None: the table is float, a plain Gather). onnxruntime's
        uint8 kernel computes (code - zp) * scale in float32 per element with the MatMulNBits layout (LSB-first
        along the row, default zp 2^(bits-1); contrib_ops/cpu/quantization/gather_block_quantized.cc): exactly
        s * (q - z). It takes the packed codes as [vocab, K * bits / 8], so the MatMulNBits initializer
        [vocab, k_blocks, blob] reaches it through a Reshape (folded at load; the file holds one copy)."""
        q = self.ckpt.quantized.get(EMBED)
        if q is None:
            return None
        w, inputs, added = self._nbits(g, EMBED, q)
        if w.zero_points is not None:  # embedding grids are lsq4/lsq8 (integer zero points); a new one must be added
            raise NBitsError(f"the {q.grid.name} embedding grid has no GatherBlockQuantized encoding")
        rows = g.op("Reshape", inputs[0], g.int64s([w.n, -1], "model.embed_tokens/rows"))
        out = g.op("GatherBlockQuantized", rows, input_ids, inputs[1], domain=MS_DOMAIN, name="model.embed_tokens",
                   bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=1)
        padded = -(-w.k // w.block_size) * w.block_size
        if padded != w.k:  # the last block's zero padding is gathered too: cut it off
            out = g.op("Slice", out, g.int64s([0], "model.embed_tokens/start"),
                       g.int64s([w.k], "model.embed_tokens/end"), g.int64s([-1], "model.embed_tokens/axis"))
        self.records.append(LinearRecord("model.embed_tokens", q.grid.name, q.grid.bits, w.encoding.kind,
                                         w.block_size, (w.n, w.k), added, w.encoding.why, op="GatherBlockQuantized"))
        return out


def _tensor_source(ckpt):
    """HF tensor name -> float32 array of a float tensor (quantized ones go through _Linears)."""

    def tensor(name: str) -> np.ndarray | None:
        return ckpt.tensors[name].float().numpy() if name in ckpt.tensors else None

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
    return f"{_basename(ckpt)}-{tag}-onnx-acc{options.accuracy_level}{'-smallest' if options.smallest else ''}"


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
        "paretoq.smallest": str(options.smallest).lower(),
        "paretoq.quantized_linears": json.dumps(
            {r.module: {"grid": r.grid, "bits": r.bits, "container": r.container, "block_size": r.block_size,
                        "op": r.op} for r in quant}, sort_keys=True),
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
    choose_block_size(MIN_BLOCK, options.max_block_size)  # fail on options and group sizes before any work
    for q in ckpt.quantized.values():
        choose_encoding(q.grid, options.accuracy_level, options.smallest)
        if q.scale.ndim == 2:
            choose_block_size(q.shape[1], options.max_block_size, q.group_size)
    extra = set(ckpt.quantized) - {f"{m}.weight" for m in spec.linear_modules()} - {EMBED}
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
    # Gemma 3: the sliding-window layers rotate with their own rope base, from their own table
    per_type = spec.local_rope_theta is not None
    cos, sin = rotary_tables(ckpt.config, spec, "full_attention" if per_type else None)
    sliding_rotary = rotary_tables(ckpt.config, spec, "sliding_attention") if per_type else None
    try:
        builder = DecoderGraph(spec, cos, sin, tensor, linears, progress=lambda it, **kw: tqdm(it, disable=disable,
                                                                                                 **kw),
                               embedding=linears.embedding, sliding_rotary=sliding_rotary)
        model = builder.build()
    except NBitsError as exc:
        raise OnnxExportError(str(exc)) from None
    for kind, why in sorted({(r.container, r.why) for r in linears.records if r.why}):
        log.info("%s: %s", kind, why)
    model.metadata_props.update(_metadata(ckpt, options, linears.records))

    with atomic_dir(output) as tmp:
        _write_folder(tmp, model, ckpt, spec, options)
        if options.check_runtime:
            check_runtime(tmp / MODEL_FILE)  # an op the installed runtime lacks: error, nothing left behind
    model_path = output / MODEL_FILE
    nbytes = model_path.stat().st_size + ((output / DATA_FILE).stat().st_size if (output / DATA_FILE).exists() else 0)
    return OnnxExportResult(output, model_path, nbytes, options.accuracy_level, time.perf_counter() - t0,
                            linears.records, builder.g.float_bytes)


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
