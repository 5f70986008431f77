"""Soft cross entropy over the draft vocabulary, a few tokens at a time, forward and backward.

``sum_{b,t} w[b,t] * -(sum_v p[b,t,v] * log_softmax(logits[b,t])_v)``. Written as plain autograd
it keeps, per TTT step, the ``[B, T, V_d]`` fp32 log-softmax and the ``w * p`` product for
backward (1 GiB per step at T=4096, V_d=32000) and makes fp32 temporaries of the same size. Here
backward keeps only the logits (in their own dtype: bf16 under autocast) and recomputes the
softmax chunk by chunk, so no ``[B, T, V_d]`` fp32 tensor is ever whole. The gradient is the
textbook one, ``w * (softmax(logits) * sum_v p - p)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..models.layers import upcast

# Tokens per chunk: 1024 x 32000 fp32 temporaries are 125 MiB, the same row chunk the teacher
# uses, and a chunk that size still fills a GPU; 0 means the whole [B, T] at once.
DEFAULT_CHUNK_TOKENS = 1024


def token_chunks(batch: int, seq_len: int, chunk_tokens: int) -> Iterator[tuple]:
    """Index tuples over ``[B, T, ...]`` covering every token once, ``chunk_tokens`` at most per
    chunk and never across samples (so a slice of a padded view stays a view); 0: one chunk."""
    if chunk_tokens <= 0:
        yield (slice(None), slice(None))
        return
    for b in range(batch):
        for start in range(0, seq_len, chunk_tokens):
            yield (b, slice(start, start + chunk_tokens))


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, chunk_tokens):  # type: ignore[override]
        ctx.save_for_backward(logits, target, weight)
        ctx.chunk_tokens = chunk_tokens
        total = logits.new_zeros((), dtype=upcast(logits[:0]).dtype)
        for rows in token_chunks(logits.shape[0], logits.shape[1], chunk_tokens):
            log_q = torch.log_softmax(upcast(logits[rows]), dim=-1)
            p = upcast(target[rows])
            total = total - (weight[rows].to(log_q.dtype) * (p * log_q).sum(-1)).sum()
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        logits, target, weight = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows in token_chunks(logits.shape[0], logits.shape[1], ctx.chunk_tokens):
            q = torch.softmax(upcast(logits[rows]), dim=-1)
            p = upcast(target[rows])
            scale = (grad * weight[rows].to(q.dtype))[..., None]
            grad_logits[rows] = q.mul_(p.sum(-1, keepdim=True)).sub_(p).mul_(scale)
        return grad_logits, None, None, None


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Weighted sum over positions of the soft cross entropy of ``logits`` ``[B, T, V]`` against
    the probabilities ``target`` ``[B, T, V]`` (no gradient), weights ``weight`` ``[B, T]``."""
    return _SoftCrossEntropy.apply(logits, target.detach(), weight.detach(), chunk_tokens)
