"""Runtime-vs-reference logit metrics, in float64 numpy (shared by the GGUF, ONNX and ExecuTorch runners)."""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logits, targets) -> float:
    """exp(mean next-token NLL): ``logits`` [T, V] of positions whose next tokens are ``targets`` [T]."""
    lp = _log_softmax(np.asarray(logits, dtype=np.float64))
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    return float(np.exp(-lp[np.arange(len(targets)), targets].mean()))


def compare_logits(ref_logits, test_logits, targets, margin: float | None = None) -> dict:
    """Compare [T, V] logits of a runtime with the reference's, position by position.

    ``targets`` [T]: the next token at each position (for perplexities). ``margin``: top-1 agreement is also
    reported on the positions where the reference's top-1 logit leads its runner-up by at least this much
    (default 10% of the reference logits' std across the vocabulary, averaged), since near-ties flip under any
    activation quantization.

    Returns mean_kl (KL(ref || test), nats), top1_agreement, top1_agreement_clear_margin, clear_margin_positions,
    margin, ppl_ref, ppl_test, ppl_ratio (test / ref), max_abs_diff, positions.
    """
    ref = np.asarray(ref_logits, dtype=np.float64)
    test = np.asarray(test_logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if ref.shape != test.shape or ref.ndim != 2 or len(targets) != ref.shape[0]:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, runtime {test.shape}, targets {targets.shape}")
    lp_ref, lp_test = _log_softmax(ref), _log_softmax(test)
    kl = (np.exp(lp_ref) * (lp_ref - lp_test)).sum(axis=-1)
    top_ref, top_test = ref.argmax(axis=-1), test.argmax(axis=-1)
    agree = top_ref == top_test
    if margin is None:
        margin = float(0.1 * ref.std(axis=-1).mean())
    part = np.partition(ref, -2, axis=-1)
    clear = (part[:, -1] - part[:, -2]) >= margin
    rows = np.arange(len(targets))
    nll_ref, nll_test = -lp_ref[rows, targets].mean(), -lp_test[rows, targets].mean()
    return {
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float(agree.mean()),
        "top1_agreement_clear_margin": float(agree[clear].mean()) if clear.any() else float("nan"),
        "clear_margin_positions": int(clear.sum()),
        "margin": float(margin),
        "ppl_ref": float(np.exp(nll_ref)),
        "ppl_test": float(np.exp(nll_test)),
        "ppl_ratio": float(np.exp(nll_test - nll_ref)),
        "max_abs_diff": float(np.abs(ref - test).max()),
        "positions": int(len(targets)),
    }
