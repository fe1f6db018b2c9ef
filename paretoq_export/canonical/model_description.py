"""One description of the model a checkpoint holds, built once from its config and read by every exporter: the
architecture family, the head layout, norms, rope and tied weights.

The supported families are listed here and nowhere else; an exporter that cannot write some variant (a sliding
window, an activation) checks the description, never the raw config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "Llama", qk_norm=False),  # SmolLM, MobileLLM-style tied embeddings, GQA
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2", qk_norm=False),  # q/k/v biases
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3", qk_norm=True),
    Family("mistral", "MistralForCausalLM", "Mistral", qk_norm=False, window_whenever_set=True),
    Family("phi3", "Phi3ForCausalLM", "Phi3", qk_norm=False, fused_projections=True,  # Phi-3, Phi-4-mini
           window_whenever_set=True),
)}

# the linears of one decoder layer, by layout
_SEPARATE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_FUSED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


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
        return cls(
            family=family, n_layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
            intermediate=int(config.get("intermediate_size") or 0), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // n_heads),
            vocab=int(config["vocab_size"]), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_positions=int(config.get("max_position_embeddings") or 2048),
            tied=bool(config.get("tie_word_embeddings", False)), hidden_act=str(config.get("hidden_act", "silu")),
            sliding_window=int(window) if window else None,
            partial_rotary_factor=float(partial), rope=rope, explicit_head_dim=bool(config.get("head_dim")),
            original_max_positions=int(original) if original else None,
        )
