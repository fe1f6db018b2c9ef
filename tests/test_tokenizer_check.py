"""How validation judges the artifact's own tokenizer against transformers."""


def test_tokenizer_corner_cases_pass_a_wrong_vocabulary_fails():
    """judge(): a runtime's pre-tokenizer corner case (a few ids differ, >= 99% agree in order) is reported but
    passes; a wrong vocabulary (most ids differ) fails validation."""
    from formats.validation import MIN_TOKEN_AGREEMENT, judge, thresholds_for

    metrics = {"kl_mean": 1e-5, "top1_clear_margin": 1.0, "top1": 1.0, "ppl_ratio": 1.0}
    base = {"metrics": metrics, "checks": {}}
    corner = {"tokens": 5000, "artifact_tokens": 5001, "equal": False, "agreement": 0.9996,
              "acceptable": 0.9996 >= MIN_TOKEN_AGREEMENT, "first_difference": "token 2242: ..."}
    wrong = {**corner, "agreement": 0.31, "acceptable": False}
    assert judge({**base, "tokenizer": corner}, thresholds_for("gguf"))["passed"]
    verdict = judge({**base, "tokenizer": wrong}, thresholds_for("gguf"))
    assert not verdict["passed"] and "31.0% agree" in verdict["failures"][0]
