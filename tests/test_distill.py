"""The chunked distillation loss (qat/distill.py) against the plain float32 formula: value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from qat.distill import chunked_distill_loss, teacher_topk


def reference_kl(student, teacher, temperature):
    """The unchunked formula: kl_div over all predicting positions in float32, times T^2."""
    s = F.log_softmax(student[:, :-1].flatten(0, 1).float() / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1].flatten(0, 1).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def logits(seed, shape=(3, 7, 50), scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 4, 5, 21, 1024])  # 21 = B*T: one chunk; 5 does not divide it
def test_chunked_equals_unchunked(temperature, chunk):
    student, teacher = logits(0), logits(1)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    expected = reference_kl(s1, teacher, temperature)
    got = chunked_distill_loss(s2, teacher, temperature, chunk_tokens=chunk)
    expected.backward()
    (got * 1.0).backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=0, atol=1e-6)
    assert s2.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_topk_with_the_whole_vocabulary_is_the_full_kl_and_grad_scales():
    student, teacher = logits(2), logits(3)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    full = chunked_distill_loss(s1, teacher, 2.0, chunk_tokens=4)
    top = chunked_distill_loss(s2, teacher_topk(teacher, 50, chunk_tokens=4), 2.0, chunk_tokens=4)
    (3 * full).backward()
    (3 * top).backward()
    assert top.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=0, atol=1e-6)


def test_topk_is_kl_over_the_renormalised_top_tokens():
    student, teacher = logits(4), logits(5)
    values, indices = teacher_topk(teacher, 5)
    assert torch.equal(values, teacher.topk(5, dim=-1).values)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    p = F.softmax(values[:, :-1].flatten(0, 1), -1)
    log_q = F.log_softmax(s1[:, :-1].flatten(0, 1), -1).gather(-1, indices[:, :-1].flatten(0, 1))
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    got = chunked_distill_loss(s2, (values, indices), 1.0, chunk_tokens=3)
    expected.backward()
    got.backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=0, atol=1e-6)


def test_bf16_logits_keep_their_dtype_and_errors():
    student = logits(6).bfloat16().requires_grad_()
    teacher = logits(7).bfloat16()
    loss = chunked_distill_loss(student, teacher, 1.0, chunk_tokens=4)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(reference_kl(student.detach(), teacher, 1.0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="same vocabulary|share the student's vocabulary"):
        chunked_distill_loss(student, teacher[..., :10])
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_distill_loss(student, teacher, chunk_tokens=0)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_cross_entropy_equals_lm_loss(chunk):
    from qat.distill import chunked_lm_loss

    student = logits(8)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(9))
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    expected = F.cross_entropy(s1[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    got = chunked_lm_loss(s2, ids, chunk_tokens=chunk)
    (2 * expected).backward()
    (2 * got).backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=0, atol=1e-6)
