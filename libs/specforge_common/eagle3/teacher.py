"""Teacher preparation: what the target says at every position, restricted to the draft vocab.

The EAGLE shift: at position t the draft sees the aux features of t and the embedding of token
t+1, and is supervised by the target distribution at t+1 (which predicts token t+2). The teacher
is padded by ``ttt_length`` positions so step k can read rows ``k .. k+T-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import TrainBatch
from ..models.layers import upcast


@dataclass
class Teacher:
    input_ids: torch.Tensor  # [B, T] token t+1 at position t, 0 at the last position
    target_p: torch.Tensor  # [B, T+K, V_d] softmax over the draft vocab; padding rows 1/V_d
    p_on_draft: torch.Tensor  # [B, T+K, V_d] target prob of each draft token (not renormalized)
    target_ids: torch.Tensor  # [B, T+K] argmax over the full target vocab; padding 0
    position_mask: torch.Tensor  # [B, T] supervised and the target's argmax is in the draft vocab
    loss_mask: torch.Tensor  # [B, T] as captured (not shifted)


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """``y[:, t] = x[:, t+1]``, zero at the end (dim 1)."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


# Rows of full-vocabulary logits materialised at once: 1024 x 128k fp32 = 512 MiB, where a whole
# 2048-token sample would need 1 GiB for the logits plus as much again for logsumexp's temporary.
TEACHER_CHUNK_ROWS = 1024


@torch.no_grad()
def prepare_teacher(
    batch: TrainBatch,
    target_head: torch.Tensor,
    t2d: torch.Tensor,
    ttt_length: int,
    *,
    chunk_rows: int = TEACHER_CHUNK_ROWS,
    probs_dtype: torch.dtype | None = None,
) -> Teacher:
    """``target_head`` is the target's lm_head weight [V, H_t]; ``t2d`` the draft-vocab mask [V].

    The full-vocab logits are computed ``chunk_rows`` positions at a time; only the
    draft-vocab outputs ([B, T, V_d]) are ever whole. ``probs_dtype``: how ``target_p`` and
    ``p_on_draft`` are stored (computed in fp32 either way); None: the logits' fp32 (or fp64).
    bf16 halves the two largest tensors of a step and rounds each probability by at most
    2^-8 of itself (docs/eagle3.md, "Memory of a train step")."""
    if batch.hidden_states is None:
        raise ValueError(
            "EAGLE-3 needs the target's final hidden states; these samples have none "
            "(captured for a block drafter?)"
        )
    hidden = shift_left(batch.hidden_states)
    B, T, _ = hidden.shape
    rows = hidden.reshape(B * T, -1)
    V_d = int(t2d.sum())
    dtype = upcast(target_head[:0]).dtype  # what ``upcast`` makes of the logits
    target_p = torch.empty(B * T, V_d, dtype=probs_dtype or dtype, device=hidden.device)
    p_on_draft = torch.empty_like(target_p)
    target_ids = torch.empty(B * T, dtype=torch.int64, device=hidden.device)
    for start in range(0, B * T, max(1, chunk_rows)):
        chunk = slice(start, start + chunk_rows)
        logits = upcast(rows[chunk].to(target_head.dtype) @ target_head.T)  # [rows, V]
        target_ids[chunk] = logits.argmax(dim=-1)
        draft_logits = logits[:, t2d]  # ascending target id == draft id order
        target_p[chunk] = draft_logits.softmax(dim=-1)
        p_on_draft[chunk] = (draft_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
    target_p, p_on_draft = target_p.view(B, T, V_d), p_on_draft.view(B, T, V_d)
    target_ids = target_ids.view(B, T)
    loss_mask = batch.loss_mask.to(dtype)
    position_mask = t2d[target_ids].to(dtype) * loss_mask

    pad_p = target_p.new_full((B, ttt_length, V_d), 1.0 / V_d)
    return Teacher(
        input_ids=shift_left(batch.input_ids),
        target_p=torch.cat([target_p, pad_p], dim=1),
        p_on_draft=torch.cat([p_on_draft, torch.zeros_like(pad_p)], dim=1),
        target_ids=torch.cat([target_ids, target_ids.new_zeros(B, ttt_length)], dim=1),
        position_mask=position_mask,
        loss_mask=loss_mask,
    )
