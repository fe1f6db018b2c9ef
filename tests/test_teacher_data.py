"""Teacher data (qat/teacher_data.py): the static-cache sampling loop against transformers' generate, seeds and
the greedy prefix, the on-disk cache, build_data with "teacher[:N]" sources, and the bench script."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_TEXT, save_tiny_model_dir, tiny_model, tiny_tokenizer

from qat import teacher_data
from qat.data import DataConfig, build_data, build_heldout, split_sources, teacher_tokens
from qat.teacher_data import (
    SamplingConfig,
    TeacherSampler,
    cache_key,
    diversity_stats,
    model_fingerprint,
    parse_token_count,
    teacher_blocks,
    tokenizer_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", **SMALL)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_sampling_equals_generate(model, tokenizer, compiled):
    """temperature 0 is greedy decoding: the static-cache loop must give generate()'s tokens. compiled: the decode
    step through dynamo (the eager backend on CPU; CUDA compiles it with inductor + CUDA graphs)."""
    sampler = TeacherSampler(model, tokenizer, batch_size=4, compile=compiled, compile_backend="eager")
    out = sampler.sample(SamplingConfig(length=20, count=6, temperature=0), progress=False)  # 2 batches
    assert out.shape == (6, 20) and out.dtype == torch.long
    expected = model.generate(out[:, :1], max_new_tokens=19, min_new_tokens=19, do_sample=False)
    assert torch.equal(out, expected)
    assert next(model.parameters()).dtype == torch.float32 and not model.training  # the caller's model untouched


def test_seeds_greedy_prefix_and_first_tokens(model, tokenizer):
    sampler = TeacherSampler(model, tokenizer, batch_size=8)
    config = SamplingConfig(length=16, count=8, seed=3, greedy_tokens=3)
    a, b = sampler.sample(config, progress=False), sampler.sample(config, progress=False)
    assert torch.equal(a, b)  # a seed gives the same sample
    other = sampler.sample(SamplingConfig(length=16, count=8, seed=4), progress=False)
    assert not torch.equal(a, other)
    # the first token: random, ordinary (no special or added token); then 3 greedy tokens, then sampled
    special = set(tokenizer.all_special_ids)
    assert not special & set(a[:, 0].tolist()) and len(set(a[:, 0].tolist())) > 1
    greedy = sampler.sample(SamplingConfig(length=16, count=8, seed=3, temperature=0), progress=False)
    assert torch.equal(a[:, :4], greedy[:, :4])
    assert not torch.equal(a[:, 4:], greedy[:, 4:])
    top1 = sampler.sample(SamplingConfig(length=16, count=8, seed=3, top_k=1), progress=False)
    assert torch.equal(top1, greedy)  # top-k 1 leaves the argmax only
    tiny_p = sampler.sample(SamplingConfig(length=16, count=8, seed=3, top_p=1e-6), progress=False)
    assert torch.equal(tiny_p, greedy)  # so does a top-p below the largest probability


def test_sampling_follows_the_model_distribution(tokenizer):
    """The exponential race samples Categorical(softmax(logits / T)): a next-token histogram over many sequences
    matches the model's probabilities after a fixed prefix."""
    model = tiny_model("llama", **SMALL)
    sampler = TeacherSampler(model, tokenizer, batch_size=4000)
    sampler.seed_ids = torch.tensor([5])  # every sequence starts from the same token
    out = sampler.sample(SamplingConfig(length=2, count=4000, greedy_tokens=0, temperature=2.0), progress=False)
    with torch.no_grad():
        probs = (model(torch.tensor([[5]])).logits[0, -1] / 2.0).softmax(-1)
    freq = torch.bincount(out[:, 1], minlength=probs.numel()).float() / len(out)
    assert (freq - probs).abs().max() < 0.02


def test_cache_reuse_and_new_settings(model, tokenizer, tmp_path, monkeypatch):
    config = SamplingConfig(length=12, count=5, seed=1)
    first = teacher_blocks(model, tokenizer, config, batch_size=4, directory=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".pt")  # no partial files left
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["count"] == 5 and meta["length"] == 12 and meta["seed"] == 1 and "distinct_4gram_ratio" in meta

    def refuse(*_, **__):
        raise AssertionError("sampled again instead of loading the cached file")

    monkeypatch.setattr(TeacherSampler, "sample", refuse)
    again = teacher_blocks(model, tokenizer, config, batch_size=4, directory=tmp_path, progress=False)
    assert torch.equal(first, again) and again.dtype == torch.long
    monkeypatch.undo()

    hotter = teacher_blocks(model, tokenizer, SamplingConfig(length=12, count=5, seed=1, temperature=1.5),
                            batch_size=4, directory=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(hotter, first)
    # the key follows the weights, the tokenizer and every sampling setting
    base = cache_key(model_fingerprint(model), tokenizer_fingerprint(tokenizer), config)
    changed = tiny_model("llama", **SMALL, seed=1)
    assert cache_key(model_fingerprint(changed), tokenizer_fingerprint(tokenizer), config) != base
    for field, value in (("greedy_tokens", 4), ("count", 6), ("length", 13), ("top_k", 5), ("seed", 2)):
        assert cache_key(model_fingerprint(model), tokenizer_fingerprint(tokenizer),
                         SamplingConfig(**{**config.__dict__, field: value})) != base, field


def test_token_counts_and_source_spelling():
    assert parse_token_count("5M") == 5_000_000 and parse_token_count("250k") == 250_000
    assert parse_token_count("1.5m") == 1_500_000 and parse_token_count("1200") == 1200
    with pytest.raises(ValueError, match="not a number"):
        parse_token_count("lots")
    assert teacher_tokens("teacher") == teacher_data.DEFAULT_TOKENS and teacher_tokens("teacher:2k") == 2000
    assert teacher_tokens("wikipedia") is None and teacher_tokens("teachers.txt") is None
    assert split_sources(["teacher:1k", "a.txt", "teacher:500"]) == (["a.txt"], 1500)


def test_build_data_with_teacher_sources(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join([TINY_TEXT] * 20))
    plain = DataConfig(sources=[str(text)], block_size=16, teacher_batch_size=8)
    text_train, text_heldout = build_data(tokenizer, plain)

    mixed = DataConfig(sources=["teacher:160", str(text)], block_size=16, teacher_batch_size=8)
    train, heldout = build_data(tokenizer, mixed, model=model)
    assert len(train) == len(text_train) + 10 and torch.equal(train[:len(text_train)], text_train)
    assert torch.equal(heldout, text_heldout)  # held-out text is the same with or without teacher data

    only = DataConfig(sources=["teacher:160"], block_size=16, heldout_source=str(text), teacher_batch_size=8)
    train_only, heldout_only = build_data(tokenizer, only, model=model)
    assert torch.equal(train_only, train[len(text_train):])  # the cached sample
    assert torch.equal(heldout_only, text_heldout)  # the held-out documents of the held-out source
    assert torch.equal(build_heldout(tokenizer, only), text_heldout)
    with pytest.raises(ValueError, match="sampled from the float model"):
        build_data(tokenizer, only)


def test_diversity_stats():
    repeated = torch.tensor([[7, 8, 9, 10] * 4] * 2)
    stats = diversity_stats(repeated)
    assert stats["distinct_token_ratio"] == pytest.approx(4 / 32, abs=1e-6)
    assert stats["distinct_4gram_ratio"] == pytest.approx(4 / 26, abs=1e-6)  # 13 windows per row, 4 distinct
    varied = torch.arange(32).view(2, 16)
    assert diversity_stats(varied)["distinct_4gram_ratio"] == 1.0


def test_bench_script(tmp_path):
    spec = importlib.util.spec_from_file_location("teacher_data_bench", REPO / "bench" / "teacher_data_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_dir = save_tiny_model_dir(tmp_path / "m", **SMALL)
    out = tmp_path / "bench.json"
    result = bench.main(["--model", str(model_dir), "--tokens", "256", "--length", "32", "--batch-size", "4",
                         "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tokens"] == 256 and saved["sequences"] == 8 and saved["tokens_per_s"] > 0
    assert saved["device"] == "cpu" and len(saved["samples"]) == 5 and result["batch_size"] == 4
    assert 0 < saved["distinct_4gram_ratio"] <= 1 and 0 <= saved["mostly_non_letters_fraction"] <= 1
