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


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "Llama", qk_norm=False),  # SmolLM, MobileLLM-style tied embeddings, GQA
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2", qk_norm=False),  # q/k/v biases
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3", qk_norm=True),
)}


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

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def transformers_prefix(self) -> str:
        return self.family.transformers_prefix

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
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        return cls(
            family=family, n_layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
            intermediate=int(config.get("intermediate_size") or 0), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // n_heads),
            vocab=int(config["vocab_size"]), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_positions=int(config.get("max_position_embeddings") or 2048),
            tied=bool(config.get("tie_word_embeddings", False)), hidden_act=str(config.get("hidden_act", "silu")),
            sliding_window=int(window) if window else None,
            partial_rotary_factor=float(config.get("partial_rotary_factor", 1.0) or 1.0),
            rope=rope_parameters(config), explicit_head_dim=bool(config.get("head_dim")),
        )
