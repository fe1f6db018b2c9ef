"""Tiny random transformers models built in the test (no hub access)."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

VOCAB = 320
RANDOM_NORMS = ("mistral", "phi3")  # the families added later are tested with random norms from the start


def tiny_config(arch: str = "llama", hidden: int = 256, intermediate: int = 512, layers: int = 2, **kw):
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(kw)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=common.pop("tie_word_embeddings", True), **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=common.pop("tie_word_embeddings", False), **common)
    if arch == "qwen3":
        return Qwen3Config(tie_word_embeddings=common.pop("tie_word_embeddings", False), head_dim=64, **common)
    if arch == "mistral":  # the default 4096-token window is wider than the context here; tests narrow it
        return MistralConfig(tie_word_embeddings=common.pop("tie_word_embeddings", False), **common)
    if arch == "phi3":  # Phi-4-mini's shape: fused projections, 3/4 of each head rotated, tied embeddings
        return Phi3Config(tie_word_embeddings=common.pop("tie_word_embeddings", True),
                          partial_rotary_factor=common.pop("partial_rotary_factor", 0.75), **common)
    if arch == "gemma3":
        # head_dim != hidden / heads; a window shorter than the test texts and a sliding/global mix that is not
        # llama.cpp's default (every 6th layer global), each with its own rope base; a wider init than the default
        # 0.02 gives logits clear margins over the int8-activation noise of XNNPACK (decode vs prefill kernels)
        common["num_hidden_layers"] = kw.get("num_hidden_layers", max(layers, 3))
        layer_types = (["sliding_attention", "full_attention", "sliding_attention"] * 4)[:common["num_hidden_layers"]]
        return Gemma3TextConfig(
            tie_word_embeddings=common.pop("tie_word_embeddings", True), head_dim=128, query_pre_attn_scalar=128,
            sliding_window=16, initializer_range=0.1, layer_types=layer_types,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            **common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).float().eval()
    # random init gives near-zero biases and all-one norms; make them visible so a dropped bias or norm would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif arch == "gemma3" and name.endswith("norm.weight"):  # Gemma's (1 + w) norms start at w = 0
                p.normal_(0, 0.3)
            elif "norm" in name and arch in RANDOM_NORMS:
                p.normal_(1, 0.1)
    return model


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "The rain in Spain stays mainly in the plain. Knowledge is power, and power is knowledge. "
)


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE tokenizer trained here; ids 0/1/2 are <pad>/<s>/</s> as in tiny_config."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TINY_TEXT] * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def save_tiny_model_dir(path, arch: str = "llama", **kw):
    """A transformers model directory (config, safetensors, tokenizer) as a user would pass with --model."""
    model = tiny_model(arch, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
