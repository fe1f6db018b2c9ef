"""The decoder graph (Llama, Qwen2/3, Mistral, Phi-3, Gemma 3) with a KV cache, written op by op with onnx_ir.

Why not torch.onnx.export: it works (DESIGN.md section 3) but on this machine took 131 s to export and 116 s to
optimize SmolLM2-135M (30 layers), with every weight traced as float first; this graph takes about a second, and
uses the standard opset-23 fused ops (RMSNormalization, RotaryEmbedding, Attention with GQA and past/present)
that onnxruntime runs directly. It follows transformers' modeling code step by step (tests compare the logits).

I/O, as onnxruntime-genai and optimum name them:
    input_ids int64 [batch, sequence_length], attention_mask int64 [batch, total_sequence_length],
    position_ids int64 [batch, sequence_length], past_key_values.N.key/value float [batch, kv_heads, past, head]
    -> logits float [batch, sequence_length, vocab], present.N.key/value float [batch, kv_heads, total, head]
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir import tape as ir_tape

from paretoq_export.canonical.model_description import (  # noqa: F401
    LENGTH_DEPENDENT_ROPE, ModelDescription, UnsupportedModelError)

OPSET = 23  # Attention, RotaryEmbedding, RMSNormalization
IR_VERSION = 11
MS_DOMAIN = "com.microsoft"
_MASKED = float(np.finfo(np.float32).min)  # additive mask value, as transformers' eager attention uses
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # GELU with the tanh approximation (Gemma)


def describe_model(config: dict) -> ModelDescription:
    """The model description, refused (UnsupportedModelError, one line) where this graph cannot express it."""
    model = ModelDescription.from_config(config, "ONNX")
    if model.hidden_act != "silu" and model.hidden_act not in _GELU_TANH:
        raise UnsupportedModelError(f"hidden_act {model.hidden_act!r} is not supported by the ONNX exporter (silu, "
                                    "gelu_pytorch_tanh)")
    if model.sliding_window and not model.family.window_whenever_set and not model.layer_types:
        # use_sliding_window without layer_types saying which layers it windows
        raise UnsupportedModelError("sliding-window attention is not supported by the ONNX exporter: export a "
                                    "config with use_sliding_window false")
    return model


def rotary_tables(config: dict, spec: ModelDescription, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim/2], computed as transformers' rotary module computes them per call
    (inv_freq * position in float32, then cos/sin times attention_scaling), so rope variants come for free.
    ``layer_type``: the table of that layer type where the module holds one per type (Gemma 3's sliding and full
    attention layers)."""
    import torch
    from transformers import AutoConfig

    module = importlib.import_module(spec.modeling_module)
    rotary = getattr(module, f"{spec.transformers_prefix}RotaryEmbedding")(config=AutoConfig.for_model(**config))
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rope_type in LENGTH_DEPENDENT_ROPE:  # these rescale inv_freq with the sequence length at run time
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported by the ONNX exporter")
    prefix = f"{layer_type}_" if layer_type else ""
    inv_freq = getattr(rotary, f"{prefix}inv_freq").float()
    positions = torch.arange(spec.max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # the same single products as transformers' outer product
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    return cos.numpy().astype(np.float32), sin.numpy().astype(np.float32)


def _io(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


class GraphWriter:
    """A tape plus initializer helpers. Float tensors are stored as fp16 followed by a Cast to float32 when fp16
    holds them exactly (checkpoint floats are fp16), halving the file; onnxruntime folds the Cast at load."""

    def __init__(self) -> None:
        self.tape = ir_tape.Tape()
        self.float_bytes = 0
        self._floats: dict[str, ir.Value] = {}  # one initializer per name: a tied lm_head reuses the table

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", name: str | None = None,
           **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes or None, domain=domain, name=name)

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(array), name=name), name=name)

    def int64s(self, values, name: str) -> ir.Value:
        return self.constant(np.asarray(values, dtype=np.int64), name)

    def float_tensor(self, array: np.ndarray, name: str) -> ir.Value:
        if name in self._floats:
            return self._floats[name]
        array = np.ascontiguousarray(array, dtype=np.float32)
        half = array.astype(np.float16)
        if np.array_equal(half.astype(np.float32), array):
            self.float_bytes += half.nbytes
            value = self.op("Cast", self.constant(half, name), to=ir.DataType.FLOAT, name=f"{name}/cast")
        else:
            self.float_bytes += array.nbytes
            value = self.constant(array, name)
        self._floats[name] = value
        return value


# emits ``x @ W^T`` for the linear module ``name`` (bias added by the caller)
LinearEmitter = Callable[[GraphWriter, ir.Value, str], ir.Value]
TensorSource = Callable[[str], "np.ndarray | None"]  # HF tensor name -> float32 values, None if absent
# emits the embedding lookup of ``input_ids`` from a quantized table, or None for a plain Gather on the float table
EmbeddingEmitter = Callable[[GraphWriter, ir.Value], "ir.Value | None"]


class DecoderGraph:
    """Builds the whole decoder: ``build()`` returns the onnx_ir Model."""

    def __init__(self, spec: ModelDescription, cos: np.ndarray, sin: np.ndarray, tensor: TensorSource,
                 linear: LinearEmitter, progress: Callable | None = None,
                 embedding: EmbeddingEmitter | None = None,
                 sliding_rotary: tuple[np.ndarray, np.ndarray] | None = None):
        """``sliding_rotary``: the cos/sin tables of the sliding-window layers where they have their own rope base
        (Gemma 3); ``cos``/``sin`` serve every other layer."""
        self.spec, self.cos, self.sin = spec, cos, sin
        self.sliding_rotary = sliding_rotary
        self.tensor, self.emit_linear = tensor, linear
        self.emit_embedding = embedding or (lambda g, ids: None)
        self.progress = progress or (lambda it, **kw: it)
        self.g = GraphWriter()

    # ------------------------------------------------------------------ pieces
    def _values(self, name: str) -> np.ndarray:
        values = self.tensor(name)
        if values is None:
            raise UnsupportedModelError(f"the checkpoint lacks {name}: not a standard {self.spec.model_type} model")
        return values

    def _weight(self, name: str) -> ir.Value:
        return self.g.float_tensor(self.spec.stored_float_values(name, self._values(name)), name)

    def linear(self, x: ir.Value, module: str) -> ir.Value:
        y = self.emit_linear(self.g, x, module)
        bias = self.tensor(f"{module}.bias")
        return y if bias is None else self.g.op("Add", y, self.g.float_tensor(bias, f"{module}.bias"))

    def rms_norm(self, x: ir.Value, name: str) -> ir.Value:
        # transformers: weight * (x * rsqrt(mean(x^2) + eps)), in float32; Gemma: (1 + weight) * (...), the sum
        # taken in float32 as Gemma3RMSNorm takes it, so the stored scale is the factor transformers multiplies by
        return self.g.op("RMSNormalization", x, self._weight(f"{name}.weight"), axis=-1, epsilon=self.spec.rms_eps,
                         name=name)

    def _head_norm(self, x: ir.Value, name: str, heads: int) -> ir.Value:
        """Qwen3 q_norm / k_norm: RMSNorm over each head_dim slice of [B, S, heads * head_dim]."""
        shape4 = self.g.int64s([0, 0, heads, self.spec.head_dim], f"{name}/shape4")
        normed = self.rms_norm(self.g.op("Reshape", x, shape4), name)
        return self.g.op("Reshape", normed, self.g.int64s([0, 0, heads * self.spec.head_dim], f"{name}/shape3"))

    def _mask(self, input_ids: ir.Value, attention_mask: ir.Value, past_key: ir.Value
              ) -> tuple[ir.Value, ir.Value | None]:
        """Additive masks [B, 1, S, past + S]: key j visible to query i iff j <= past + i and attention_mask[b, j];
        and the sliding-window layers' mask (None without a window)."""
        g = self.g
        zero, one = g.int64s(0, "mask/zero"), g.int64s(1, "mask/one")
        seq = g.op("Squeeze", g.op("Shape", input_ids, start=1, end=2))
        past = g.op("Squeeze", g.op("Shape", past_key, start=2, end=3))
        total = g.op("Add", past, seq)
        q_pos = g.op("Unsqueeze", g.op("Range", past, total, one), one)  # [S, 1]
        k_pos = g.op("Unsqueeze", g.op("Range", zero, total, one), zero)  # [1, T]
        causal = g.op("LessOrEqual", k_pos, q_pos)  # [S, T]
        padding = g.op("Unsqueeze", g.op("Cast", attention_mask, to=ir.DataType.BOOL), g.int64s([1, 2], "mask/axes"))
        allowed = g.op("And", causal, padding)  # [B, 1, S, T]
        open_, closed = g.constant(np.array(0.0, np.float32), "mask/open"), g.constant(np.array(_MASKED, np.float32),
                                                                                        "mask/closed")
        additive = g.op("Where", allowed, open_, closed, name="attention_mask/additive")
        if not self.spec.sliding_window:
            return additive, None
        # sliding layers also hide keys sliding_window or more positions back (transformers' sliding_window_overlay:
        # kv > q - window)
        near = g.op("Greater", k_pos, g.op("Sub", q_pos, g.int64s(self.spec.sliding_window, "mask/window")))
        sliding = g.op("Where", g.op("And", allowed, near), open_, closed, name="attention_mask/sliding")
        return additive, sliding

    def _attention(self, x, layer, mask, position_ids, cos, sin, past_k, past_v):
        s, g, prefix = self.spec, self.g, f"model.layers.{layer}.self_attn"
        if s.family.fused_projections:  # Phi-3: one MatMulNBits over the fused rows, split into q, k, v
            q, k, v = self._split(self.linear(x, f"{prefix}.qkv_proj"), f"{prefix}.qkv_proj",
                                  [s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim])
        else:
            q = self.linear(x, f"{prefix}.q_proj")
            k = self.linear(x, f"{prefix}.k_proj")
            v = self.linear(x, f"{prefix}.v_proj")
        if s.qk_norm:
            q = self._head_norm(q, f"{prefix}.q_norm", s.n_heads)
            k = self._head_norm(k, f"{prefix}.k_norm", s.n_kv_heads)
        # partial rotary (Phi-4-mini): the leading rotary_dim of each head rotate, the rest pass through
        partial = {"rotary_embedding_dim": s.rotary_dim} if s.rotary_dim != s.head_dim else {}
        q = g.op("RotaryEmbedding", q, cos, sin, position_ids, num_heads=s.n_heads, name=f"{prefix}/rotary_q",
                 **partial)
        k = g.op("RotaryEmbedding", k, cos, sin, position_ids, num_heads=s.n_kv_heads, name=f"{prefix}/rotary_k",
                 **partial)
        attributes = {"q_num_heads": s.n_heads, "kv_num_heads": s.n_kv_heads, "scale": s.attention_scale}
        if s.attn_logit_softcapping:
            attributes["softcap"] = float(s.attn_logit_softcapping)
        out, present_k, present_v = g.tape.op_multi_out(
            "Attention", [q, k, v, mask, past_k, past_v], attributes, num_outputs=3, name=f"{prefix}/attention")
        return self.linear(out, f"{prefix}.o_proj"), present_k, present_v

    def _split(self, x: ir.Value, name: str, widths: list[int]) -> list[ir.Value]:
        """The last axis of ``x`` cut into consecutive pieces of ``widths`` (a fused projection's outputs)."""
        return self.g.tape.op_multi_out("Split", [x, self.g.int64s(widths, f"{name}/split")], {"axis": -1},
                                        num_outputs=len(widths), name=f"{name}/split")

    def _mlp(self, x: ir.Value, layer: int) -> ir.Value:
        prefix, g = f"model.layers.{layer}.mlp", self.g
        if self.spec.family.fused_projections:  # Phi-3: gate rows first, then up (transformers' chunk(2))
            gate, up = self._split(self.linear(x, f"{prefix}.gate_up_proj"), f"{prefix}.gate_up_proj",
                                   [self.spec.intermediate] * 2)
        else:
            gate = self.linear(x, f"{prefix}.gate_proj")
            up = self.linear(x, f"{prefix}.up_proj")
        if self.spec.hidden_act in _GELU_TANH:
            act = g.op("Gelu", gate, approximate="tanh")
        else:
            act = g.op("Mul", gate, g.op("Sigmoid", gate))  # silu
        return self.linear(g.op("Mul", act, up), f"{prefix}.down_proj")

    # ------------------------------------------------------------------ whole graph
    def build(self) -> ir.Model:
        s, g = self.spec, self.g
        f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
        input_ids = _io("input_ids", i64, ["batch_size", "sequence_length"])
        attention_mask = _io("attention_mask", i64, ["batch_size", "total_sequence_length"])
        position_ids = _io("position_ids", i64, ["batch_size", "sequence_length"])
        kv_shape = ["batch_size", s.n_kv_heads, "past_sequence_length", s.head_dim]
        pasts = [(_io(f"past_key_values.{i}.key", f32, kv_shape), _io(f"past_key_values.{i}.value", f32, kv_shape))
                 for i in range(s.n_layers)]

        cos = g.constant(self.cos, "rotary/cos_cache")
        sin = g.constant(self.sin, "rotary/sin_cache")
        if self.sliding_rotary is not None:
            sliding_cos = g.constant(self.sliding_rotary[0], "rotary/sliding_cos_cache")
            sliding_sin = g.constant(self.sliding_rotary[1], "rotary/sliding_sin_cache")
        mask, sliding_mask = self._mask(input_ids, attention_mask, pasts[0][0])
        h = self.emit_embedding(g, input_ids)
        if h is None:
            h = g.op("Gather", self._weight("model.embed_tokens.weight"), input_ids, axis=0, name="model.embed_tokens")
        if s.embedding_scale is not None:  # the float32 reference multiplies its float32 lookup by float32 sqrt(hidden)
            h = g.op("Mul", h, g.constant(np.array(s.embedding_scale, np.float32), "model.embed_tokens/scale"))
        presents = []
        for layer in self.progress(range(s.n_layers), desc="onnx layers", unit="layer"):
            prefix = f"model.layers.{layer}"
            sliding = s.is_sliding(layer)
            rotary = (sliding_cos, sliding_sin) if sliding and self.sliding_rotary is not None else (cos, sin)
            attn, pk, pv = self._attention(self.rms_norm(h, f"{prefix}.input_layernorm"), layer,
                                           sliding_mask if sliding else mask, position_ids, *rotary, *pasts[layer])
            if s.family.sandwich_norms:  # Gemma: norms on both sides of attention and MLP
                h = g.op("Add", h, self.rms_norm(attn, f"{prefix}.post_attention_layernorm"))
                mlp = self._mlp(self.rms_norm(h, f"{prefix}.pre_feedforward_layernorm"), layer)
                h = g.op("Add", h, self.rms_norm(mlp, f"{prefix}.post_feedforward_layernorm"))
            else:
                h = g.op("Add", h, attn)
                h = g.op("Add", h, self._mlp(self.rms_norm(h, f"{prefix}.post_attention_layernorm"), layer))
            pk.name, pv.name = f"present.{layer}.key", f"present.{layer}.value"
            pk.shape = pv.shape = ir.Shape(["batch_size", s.n_kv_heads, "total_sequence_length", s.head_dim])
            presents += [pk, pv]
        logits = self.linear(self.rms_norm(h, "model.norm"), "lm_head")
        if s.final_logit_softcapping:  # c * tanh(logits / c)
            cap = g.constant(np.array(s.final_logit_softcapping, np.float32), "logits/softcap")
            logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, cap)), cap)
        logits.name = "logits"
        logits.shape = ir.Shape(["batch_size", "sequence_length", s.vocab])
        for out in [logits, *presents]:
            out.type = ir.TensorType(f32)

        inputs = [input_ids, attention_mask, position_ids] + [v for pair in pasts for v in pair]
        graph = ir.Graph(inputs, [logits, *presents], nodes=g.tape.nodes, initializers=g.tape.initializers,
                         opset_imports={"": OPSET, MS_DOMAIN: 1}, name=f"paretoq_{s.model_type}_decoder")
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="paretoq-export")
