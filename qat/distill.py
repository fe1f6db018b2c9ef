"""Training losses that scale: next-token cross-entropy and the distillation KL(teacher || student) per predicted
token, never in float32 for the whole batch.

The plain formula (log_softmax of both [B*T, V] logits in float32, then kl_div, then autograd) holds four or five
float32 copies of the logits for the backward: at SmolLM2's vocabulary of 49152 and 16k tokens per micro-batch,
about 3 GB each. Here the loss is computed over chunks of ``chunk_tokens`` rows at a time, and so is its gradient,
which has a closed form, T * (softmax(s / T) - softmax(t / T)) / N per row (the T^2 scaling included): the backward
recomputes each chunk's two softmaxes from the saved logits (in their own dtype, bf16 under autocast) rather than
keeping float32 intermediates. Extra memory: one chunk's float32 temporaries, plus the gradient in the logits'
dtype that autograd needs anyway.

The cross-entropy (``chunked_lm_loss``) is done the same way: its gradient is (softmax(s) - onehot(y)) / N per row.

``topk``: distil only the teacher's top-k tokens per position (its distribution renormalised over them), the
teacher given as (values, indices) of shape [B, T, k]: the teacher's full logits need not stay alive beside the
student's. The gradient is then T * (softmax(s / T) - scatter(p_topk)) / N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 1024


def _valid_rows(start: int, stop: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """1.0 for rows (flattened [B*T] positions) that predict a next token, 0.0 for each sequence's last."""
    rows = torch.arange(start, stop, device=device)
    return (rows % seq_len != seq_len - 1).float()


def _teacher_chunk(teacher, start: int, stop: int, vocab: int, temperature: float):
    """(log p, p) of the teacher for rows [start, stop): dense [c, V], or over the top-k support [c, k]."""
    if isinstance(teacher, tuple):
        values, _ = teacher
        log_p = F.log_softmax(values[start:stop].float() / temperature, dim=-1)
    else:
        log_p = F.log_softmax(teacher[start:stop].float() / temperature, dim=-1)
    return log_p, log_p.exp()


def _flat_teacher(dense: torch.Tensor | None, top_values: torch.Tensor | None, top_indices: torch.Tensor | None,
                  vocab: int):
    """The teacher as [tokens, vocab] logits, or (top-k values, their indices) each [tokens, k]."""
    if dense is not None:
        return dense.reshape(-1, vocab)
    return top_values.reshape(-1, top_values.shape[-1]), top_indices.reshape(-1, top_indices.shape[-1])


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher_dense: torch.Tensor | None, top_values: torch.Tensor | None,
                top_indices: torch.Tensor | None, temperature: float, chunk: int) -> torch.Tensor:
        batch, seq_len, vocab = student.shape
        s_flat = student.reshape(-1, vocab)
        teacher = _flat_teacher(teacher_dense, top_values, top_indices, vocab)
        n_predicted = batch * (seq_len - 1)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        with torch.autocast(student.device.type, enabled=False):
            for start in range(0, s_flat.shape[0], chunk):
                stop = min(start + chunk, s_flat.shape[0])
                log_q = F.log_softmax(s_flat[start:stop].float() / temperature, dim=-1)
                log_p, p = _teacher_chunk(teacher, start, stop, vocab, temperature)
                if isinstance(teacher, tuple):
                    log_q = log_q.gather(-1, teacher[1][start:stop])
                kl_rows = (p * (log_p - log_q)).sum(-1)
                total += (kl_rows * _valid_rows(start, stop, seq_len, student.device)).sum()
        ctx.save_for_backward(student, teacher_dense, top_values, top_indices)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total / n_predicted * temperature**2

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, teacher_dense, top_values, top_indices = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        batch, seq_len, vocab = student.shape
        s_flat = student.reshape(-1, vocab)
        teacher = _flat_teacher(teacher_dense, top_values, top_indices, vocab)
        scale = grad_output.float() * temperature / (batch * (seq_len - 1))
        grad = torch.empty_like(s_flat)
        with torch.autocast(student.device.type, enabled=False):
            for start in range(0, s_flat.shape[0], chunk):
                stop = min(start + chunk, s_flat.shape[0])
                g = F.softmax(s_flat[start:stop].float() / temperature, dim=-1)
                _, p = _teacher_chunk(teacher, start, stop, vocab, temperature)
                if isinstance(teacher, tuple):
                    g.scatter_add_(-1, teacher[1][start:stop], -p)
                else:
                    g -= p
                g *= _valid_rows(start, stop, seq_len, student.device).unsqueeze(-1) * scale
                grad[start:stop] = g.to(grad.dtype)
        return grad.view_as(student), None, None, None, None, None


def chunked_distill_loss(student_logits: torch.Tensor, teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                         temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """KL(teacher || student) per predicted token at a temperature, times T^2 (Hinton: keeps the gradient's size
    independent of T); the same value and gradient as kl_div(log_softmax(s / T), log_softmax(t / T),
    log_target=True, reduction="batchmean") * T^2 over the [B, T-1] predicting positions.

    teacher: its logits [B, T, V] (any dtype), or (values, indices) [B, T, k] of its top-k logits (``teacher_topk``).
    Only the student's logits get a gradient."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if student_logits.ndim != 3 or student_logits.shape[1] < 2:
        raise ValueError(f"student logits must be [batch, seq >= 2, vocab], got {tuple(student_logits.shape)}")
    if isinstance(teacher, tuple):
        values, indices = teacher
        if values.shape[:2] != student_logits.shape[:2] or values.shape != indices.shape:
            raise ValueError(f"teacher top-k {tuple(values.shape)} / {tuple(indices.shape)} do not match the "
                             f"student's logits {tuple(student_logits.shape)}")
        return _ChunkedKL.apply(student_logits, None, values.detach(), indices.detach(), temperature, chunk_tokens)
    if student_logits.shape != teacher.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}: the teacher must share the student's vocabulary")
    return _ChunkedKL.apply(student_logits, teacher.detach(), None, None, temperature, chunk_tokens)


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [B, T, k] of the teacher's k largest logits per position, taken chunk by chunk."""
    batch, seq_len, vocab = teacher_logits.shape
    flat = teacher_logits.reshape(-1, vocab)
    values = torch.empty(flat.shape[0], k, dtype=teacher_logits.dtype, device=teacher_logits.device)
    indices = torch.empty(flat.shape[0], k, dtype=torch.long, device=teacher_logits.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        top = flat[start:start + chunk_tokens].topk(k, dim=-1)
        values[start:start + chunk_tokens], indices[start:start + chunk_tokens] = top.values, top.indices
    return values.view(batch, seq_len, k), indices.view(batch, seq_len, k)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        batch, seq_len, vocab = logits.shape
        flat = logits.reshape(-1, vocab)
        # each row's target is the next token; a sequence's last row has none (weight 0, target clamped to 0)
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, flat.shape[0], chunk):
                stop = min(start + chunk, flat.shape[0])
                nll = F.cross_entropy(flat[start:stop].float(), targets[start:stop], reduction="none")
                total += (nll * _valid_rows(start, stop, seq_len, logits.device)).sum()
        ctx.save_for_backward(logits, targets)
        ctx.chunk = chunk
        return total / (batch * (seq_len - 1))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets = ctx.saved_tensors
        batch, seq_len, vocab = logits.shape
        flat = logits.reshape(-1, vocab)
        scale = grad_output.float() / (batch * (seq_len - 1))
        grad = torch.empty_like(flat)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, flat.shape[0], ctx.chunk):
                stop = min(start + ctx.chunk, flat.shape[0])
                g = F.softmax(flat[start:stop].float(), dim=-1)
                g.scatter_add_(-1, targets[start:stop, None], torch.full((stop - start, 1), -1.0, device=g.device))
                g *= _valid_rows(start, stop, seq_len, logits.device).unsqueeze(-1) * scale
                grad[start:stop] = g.to(grad.dtype)
        return grad.view_as(logits), None, None


def chunked_lm_loss(logits: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Next-token cross-entropy (mean over the [B, T-1] predicting positions), in float32 one chunk of rows at a
    time: the same value and gradient as qat.trainer.lm_loss without its float32 copies of all the logits."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if logits.ndim != 3 or logits.shape[:2] != ids.shape or logits.shape[1] < 2:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} must be [B, T >= 2, V] and [B, T]")
    return _ChunkedCrossEntropy.apply(logits, ids, chunk_tokens)
