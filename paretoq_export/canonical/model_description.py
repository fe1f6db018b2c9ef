"""One description of the model a checkpoint holds, built once from its config and read by every exporter: the
architecture family, the head layout, norms, rope and tied weights.

The supported families are listed here and nowhere else; an exporter that cannot write some variant (a sliding
window, an activation) checks the description, never the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class UnsupportedModelError(ValueError):
    """A model no exporter can write; one line naming the problem and what is supported."""


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    hf_class: str  # config.json "architectures"[0]
    transformers_prefix: str  # class-name prefix in transformers.models.<model_type> (LlamaRotaryEmbedding, ...)
    qk_norm: bool  # RMSNorm on each head of q and k before rotary (Qwen3)
    # one qkv_proj and one gate_up_proj linear per layer (Phi-3): quantized fused, per row, like any linear
    fused_projections: bool = False
    # the config's sliding_window applies to every layer whenever it is set (Mistral, Phi-3); otherwise only where
    # use_sliding_window turns it on (Qwen2/Qwen3, whose layer_types may then window some layers only)
    window_whenever_set: bool = False
    # Gemma: RMSNorm scales by (norm_offset + weight), computed in float32
    norm_offset: float = 0.0
    # Gemma 2/3: norms on the attention and MLP outputs too (post_attention_layernorm is the attention output's norm,
    # pre_feedforward_layernorm the MLP input's), where Llama's post_attention_layernorm is the MLP input's norm
    sandwich_norms: bool = False
    embedding_scaled: bool = False  # the embedding lookup is multiplied by sqrt(hidden) (Gemma)
    transformers_module: str = ""  # transformers.models.<this> where it is not the model_type (gemma3_text: gemma3)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "Llama", qk_norm=False),  # SmolLM, MobileLLM-style tied embeddings, GQA
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2", qk_norm=False),  # q/k/v biases
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3", qk_norm=True),
    Family("mistral", "MistralForCausalLM", "Mistral", qk_norm=False, window_whenever_set=True),
    Family("phi3", "Phi3ForCausalLM", "Phi3", qk_norm=False, fused_projections=True,  # Phi-3, Phi-4-mini
           window_whenever_set=True),
    # interleaved sliding-window / global layers with their own rope bases, GELU-tanh MLP
    Family("gemma3_text", "Gemma3ForCausalLM", "Gemma3", qk_norm=True, norm_offset=1.0, sandwich_norms=True,
           embedding_scaled=True, transformers_module="gemma3"),
)}

# the linears of one decoder layer, by layout
_SEPARATE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_FUSED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# their module names, as QAT's prepare matches decoder linears: a fused weight is quantized per row like any other,
# each row keeping its own step, so splitting it later is exact
DECODER_LINEAR_NAMES = tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for path in _SEPARATE_LINEARS + _FUSED_LINEARS))


# rope types whose frequencies change with the sequence length at run time (Phi-3 128k's longrope): no fixed table
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def family_of(config: dict) -> Family | None:
    """The supported family of a config (by model_type, else by its architectures), or None."""
    family = FAMILIES.get(config.get("model_type"))
    for hf_class in config.get("architectures") or ():
        family = family or next((f for f in FAMILIES.values() if f.hf_class == hf_class), None)
    return family


def rope_parameters(config: dict) -> dict:
    """rope_theta, rope_type and any scaling parameters, from transformers 5's rope_parameters or the older
    rope_scaling / rope_theta keys."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


@dataclass(frozen=True)
class ModelDescription:
    family: Family
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    max_positions: int
    tied: bool
    hidden_act: str
    sliding_window: int | None  # set only where the config turns sliding-window attention on
    partial_rotary_factor: float
    rope: dict = field(compare=False)
    explicit_head_dim: bool = False  # config.json names head_dim (not derived from hidden / heads)
    original_max_positions: int | None = None  # the pre-extension context (Phi-3's original_max_position_embeddings)
    # per layer "sliding_attention" / "full_attention" (Gemma 3); empty: every layer alike (sliding when
    # sliding_window is set)
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # rope base of the sliding layers, where it differs from rope["rope_theta"]
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root (Gemma); None: head_dim
    final_logit_softcapping: float | None = None  # logits -> c * tanh(logits / c)
    attn_logit_softcapping: float | None = None  # attention scores -> c * tanh(scores / c) (Gemma 2)

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def transformers_prefix(self) -> str:
        return self.family.transformers_prefix

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type") or "default").lower()

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that rotary rotates (all of head_dim unless partial_rotary_factor < 1), as
        transformers computes it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_linears(self) -> tuple[str, ...]:
        """The linears of one decoder layer, relative to ``model.layers.N`` (fused qkv / gate_up for Phi-3)."""
        return _FUSED_LINEARS if self.family.fused_projections else _SEPARATE_LINEARS

    def linear_modules(self) -> list[str]:
        """Every linear module name of the model, layer by layer, then lm_head."""
        return [f"model.layers.{i}.{name}" for i in range(self.n_layers) for name in self.layer_linears] + ["lm_head"]

    @property
    def modeling_module(self) -> str:
        """The transformers module defining the family's classes."""
        name = self.family.transformers_module or self.model_type
        return f"transformers.models.{name}.modeling_{name}"

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embedding_scale(self) -> float | None:
        """The factor of the embedding lookup (sqrt(hidden), Gemma), or None."""
        return self.hidden ** 0.5 if self.family.embedding_scaled else None

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends only to the last ``sliding_window`` positions."""
        if not self.sliding_window:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"

    def stored_float_values(self, tensor_name: str, values: np.ndarray) -> np.ndarray:
        """The values a runtime whose RMSNorm multiplies by its stored weight must hold for float tensor
        ``tensor_name``: Gemma's norms as (1 + w), summed in float32 as transformers' Gemma3RMSNorm sums them (so
        the factor is the one transformers multiplies by; llama.cpp's converter stores the same); any other tensor
        as the checkpoint holds it."""
        if self.family.norm_offset and tensor_name.endswith("norm.weight"):
            return values.astype(np.float32) + np.float32(self.family.norm_offset)
        return values

    @classmethod
    def from_config(cls, config: dict, exporter: str = "", error: type[ValueError] = UnsupportedModelError
                    ) -> "ModelDescription":
        """Raises ``error`` (one line: what the model is, what is supported) for an unsupported family."""
        family = family_of(config)
        if family is None:
            who = f" by the {exporter} exporter" if exporter else ""
            supported = ", ".join(f.hf_class for f in FAMILIES.values())
            raise error(f"architecture {config.get('architectures') or config.get('model_type')!r} is not supported"
                        f"{who}: supported are {supported}")
        n_heads = int(config["num_attention_heads"])
        window_on = family.window_whenever_set or config.get("use_sliding_window")
        window = config.get("sliding_window") if window_on else None
        rope = rope_parameters(config)
        partial = config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        layer_types = tuple(config.get("layer_types") or ())
        if "sliding_attention" in layer_types:  # Gemma 3 (and Qwen's windowed layers): the layers typed sliding
            window = config.get("sliding_window")
        if not window or "sliding_attention" not in layer_types:
            layer_types = ()  # every layer alike: windowed whenever sliding_window is set
        local_rope = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
        local_theta = local_rope.get("rope_theta", config.get("rope_local_base_freq"))
        return cls(
            family=family, n_layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
            intermediate=int(config.get("intermediate_size") or 0), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // n_heads),
            vocab=int(config["vocab_size"]), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_positions=int(config.get("max_position_embeddings") or 2048),
            tied=bool(config.get("tie_word_embeddings", False)),
            hidden_act=str(config.get("hidden_act") or config.get("hidden_activation") or "silu"),
            sliding_window=int(window) if window else None,
            partial_rotary_factor=float(partial), rope=rope, explicit_head_dim=bool(config.get("head_dim")),
            original_max_positions=int(original) if original else None,
            layer_types=layer_types,
            local_rope_theta=float(local_theta) if local_theta is not None and window else None,
            query_pre_attn_scalar=_optional_float(config.get("query_pre_attn_scalar")),
            final_logit_softcapping=_optional_float(config.get("final_logit_softcapping")),
            attn_logit_softcapping=_optional_float(config.get("attn_logit_softcapping")),
        )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
