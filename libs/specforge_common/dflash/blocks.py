"""What the draft sees and learns per block: token ids, positions, attention mask, labels.

A block anchored at ``a`` holds ``[input_ids[a], MASK x (bs-1)]`` at positions ``a .. a+bs-1``.
Queries are all blocks of a sequence at once (``Q = A*bs``); keys are the ``T`` context positions
followed by the ``Q`` block tokens. Drafted position ``j`` (``0 .. D-1``) is supervised by token
``a + j + 1``: block position ``j + 1`` (``D = bs-1``) or, with ``shift_label``, ``j`` (``D = bs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def block_token_ids(
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    mask_token_id: int,
) -> torch.Tensor:
    """[B, A, bs]: the anchor's token then MASK tokens (all MASK for invalid blocks)."""
    B, A = anchors.shape
    ids = torch.full((B, A, block_size), mask_token_id, dtype=torch.int64, device=anchors.device)
    first = input_ids.gather(1, anchors)
    ids[:, :, 0] = torch.where(valid, first, torch.full_like(first, mask_token_id))
    return ids


def block_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, A*bs] position ids ``anchor + k``."""
    B, A = anchors.shape
    offsets = torch.arange(block_size, device=anchors.device)
    return (anchors[:, :, None] + offsets).reshape(B, A * block_size)


def block_attention_mask(
    anchors: torch.Tensor,
    valid: torch.Tensor,
    attention_mask: torch.Tensor,
    block_size: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """[B, A*bs, T + A*bs] bool, True = may attend (non-causal inside a block).

    A valid block's query sees real context positions strictly before its anchor (the anchor's
    own target state is what the block drafts from in serving, not yet known) and every token of
    its own block. An invalid block sees only its own block, so its rows stay finite. With a
    sliding window ``W`` a query at position ``p`` sees only keys at positions ``> p - W``.
    """
    B, A = anchors.shape
    T = attention_mask.shape[1]
    Q = A * block_size
    device = anchors.device
    offset = torch.arange(Q, device=device) % block_size  # [Q]
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, Q]
    q_valid = valid.repeat_interleave(block_size, dim=1)
    q_pos = q_anchor + offset
    ctx = torch.arange(T, device=device)[None, None, :]  # [1, 1, T]
    sees_context = (
        (ctx < q_anchor[:, :, None]) & attention_mask.bool()[:, None, :] & q_valid[:, :, None]
    )
    block_of = torch.arange(Q, device=device) // block_size
    sees_block = block_of[:, None] == block_of[None, :]  # [Q, Q]
    if sliding_window is not None:
        sees_context = sees_context & (ctx > (q_pos - sliding_window)[:, :, None])
        sees_block = sees_block & (offset[None, :] > offset[:, None] - sliding_window)
    return torch.cat([sees_context, sees_block.expand(B, Q, Q)], dim=-1)


@dataclass
class BlockTargets:
    labels: torch.Tensor  # [B, A, D] int64: token anchor + j + 1 (0 where out of bounds)
    supervised: torch.Tensor  # [B, A, D] bool: valid block, in bounds, loss-masked label
    weights: torch.Tensor  # [B, A, D] float32: supervised * decay exp(-j / gamma)


def block_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    anchors: torch.Tensor,
    valid: torch.Tensor,
    num_drafted: int,
    loss_decay_gamma: float | None,
) -> BlockTargets:
    """Labels and loss weights of every drafted position. The decay counts from the first
    drafted position (weight 1), whichever block position that is."""
    T = input_ids.shape[1]
    j = torch.arange(num_drafted, device=anchors.device)
    index = anchors[:, :, None] + 1 + j  # [B, A, D]
    lengths = attention_mask.sum(dim=1)[:, None, None]
    in_bounds = index < lengths
    safe = index.clamp(max=T - 1).flatten(1)
    labels = input_ids.gather(1, safe).view_as(index) * in_bounds
    supervised = valid[:, :, None] & in_bounds & loss_mask.bool().gather(1, safe).view_as(index)
    weights = supervised.float()
    if loss_decay_gamma is not None and loss_decay_gamma > 0:
        weights = weights * torch.exp(-j.float() / loss_decay_gamma)
    return BlockTargets(labels, supervised, weights)


def previous_tokens(
    input_ids: torch.Tensor, anchors: torch.Tensor, num_drafted: int
) -> torch.Tensor:
    """[B, A, D]: token ``anchor + j``, the one before drafted position ``j``'s label (clamped to
    the sequence; past its end the labels are unsupervised anyway)."""
    T = input_ids.shape[1]
    index = (anchors[:, :, None] + torch.arange(num_drafted, device=anchors.device)).clamp(
        max=T - 1
    )
    return input_ids.gather(1, index.flatten(1)).view_as(index)
