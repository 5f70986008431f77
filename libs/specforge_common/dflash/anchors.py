"""Where blocks start: anchor positions drawn per sequence, reproducibly from the sample's seed.

An anchor ``t`` is a position whose token and next token are both supervised (``loss_mask[t]``
and ``loss_mask[t+1]``, ``t+1`` inside the sequence), so every block has a first label to learn.
"""

from __future__ import annotations

import torch

_SEED_MASK = (1 << 64) - 1  # torch generators take a non-negative 64-bit seed


def anchor_candidates(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: t may start a block."""
    B, T = loss_mask.shape
    lengths = attention_mask.sum(dim=1, keepdim=True)
    supervised = loss_mask.bool()
    ok = torch.zeros(B, T, dtype=torch.bool, device=loss_mask.device)
    next_inside = torch.arange(1, T, device=loss_mask.device)[None, :] < lengths
    ok[:, :-1] = supervised[:, :-1] & supervised[:, 1:] & next_inside
    return ok


def sample_anchors(
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    seeds: torch.Tensor | None,
    num_anchors: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` distinct anchors per row, uniform without replacement, ascending.

    Row ``b`` draws with a generator seeded by ``seeds[b]`` (0 when ``seeds`` is None), so a
    sample gets the same anchors wherever and whenever it is trained. Returns anchors [B, A]
    int64 and their validity [B, A] bool; rows with fewer candidates are padded with invalid
    anchors at position 0. ``A >= 1`` so shapes stay non-empty.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be positive, not {num_anchors}")
    device = loss_mask.device
    candidates = anchor_candidates(loss_mask, attention_mask).cpu()
    B = candidates.shape[0]
    row_seeds = [0] * B if seeds is None else [int(s) for s in seeds.tolist()]
    picked: list[torch.Tensor] = []
    for b in range(B):
        positions = candidates[b].nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(row_seeds[b] & _SEED_MASK)
        order = torch.randperm(positions.numel(), generator=generator)[:num_anchors]
        picked.append(positions[order].sort().values)
    A = max(1, max(p.numel() for p in picked))
    anchors = torch.zeros(B, A, dtype=torch.int64)
    valid = torch.zeros(B, A, dtype=torch.bool)
    for b, p in enumerate(picked):
        anchors[b, : p.numel()] = p
        valid[b, : p.numel()] = True
    return anchors.to(device), valid.to(device)
