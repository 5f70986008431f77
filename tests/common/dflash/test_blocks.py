"""Anchors, block inputs, the block attention mask and the labels against per-element rules."""

from __future__ import annotations

import math

import pytest
import torch

from specforge_common.dflash.anchors import sample_anchors
from specforge_common.dflash.blocks import (
    block_attention_mask,
    block_positions,
    block_targets,
    block_token_ids,
    previous_tokens,
)


def masks(lengths: list[int], supervised: list[list[int]], T: int) -> tuple[torch.Tensor, ...]:
    attention = torch.zeros(len(lengths), T, dtype=torch.int64)
    loss = torch.zeros_like(attention)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
        loss[b, supervised[b]] = 1
    return attention, loss


def test_anchors_satisfy_the_rule_and_are_distinct() -> None:
    T = 30
    attention, loss = masks(
        [30, 22, 3], [list(range(5, 30)), [2, 3, 4, 8, 10, 11, 12, 20, 21], [0]], T
    )
    loss[2, 1] = 0
    seeds = torch.tensor([11, 12, 13])
    anchors, valid = sample_anchors(loss, attention, seeds, num_anchors=8)
    assert anchors.shape == (3, 8)
    for b in range(3):
        length = int(attention[b].sum())
        rule = [t for t in range(T - 1) if loss[b, t] and loss[b, t + 1] and t + 1 < length]
        chosen = anchors[b][valid[b]].tolist()
        assert len(chosen) == min(8, len(rule))
        assert len(set(chosen)) == len(chosen) and chosen == sorted(chosen)
        assert set(chosen) <= set(rule)
    assert valid[1].sum() == 5  # 2, 3, 10, 11, 20: fewer than 8, padded with invalid blocks
    assert set(anchors[1][valid[1]].tolist()) == {2, 3, 10, 11, 20}
    assert not valid[2].any()  # no two consecutive supervised tokens


def test_anchors_are_a_function_of_the_seed() -> None:
    attention, loss = masks([40, 40], [list(range(40)), list(range(40))], 40)
    a1, _ = sample_anchors(loss, attention, torch.tensor([5, 5]), num_anchors=6)
    a2, _ = sample_anchors(loss, attention, torch.tensor([5, 6]), num_anchors=6)
    assert torch.equal(a1[0], a1[1])  # same seed, same candidates: same draw
    assert torch.equal(a1[0], a2[0])  # reproducible across calls
    assert not torch.equal(a2[0], a2[1])  # another seed, another draw
    a3, _ = sample_anchors(loss, attention, None, num_anchors=6)  # no seeds: seed 0 per row
    a4, _ = sample_anchors(loss, attention, torch.tensor([0, 0]), num_anchors=6)
    assert torch.equal(a3, a4)
    # uniform: every candidate shows up over many seeds
    seen = set()
    for s in range(200):
        a, _ = sample_anchors(loss[:1], attention[:1], torch.tensor([s]), num_anchors=6)
        seen |= set(a[0].tolist())
    assert seen == set(range(39))


def test_block_ids_and_positions() -> None:
    ids = torch.arange(10, 30).view(2, 10)
    anchors = torch.tensor([[1, 4], [6, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    blocks = block_token_ids(ids, anchors, valid, 3, mask_token_id=99)
    assert blocks.tolist() == [[[11, 99, 99], [14, 99, 99]], [[26, 99, 99], [99, 99, 99]]]
    assert block_positions(anchors, 3).tolist() == [[1, 2, 3, 4, 5, 6], [6, 7, 8, 0, 1, 2]]


@pytest.mark.parametrize("window", [None, 3, 5])
def test_attention_mask_matches_the_per_element_rule(window: int | None) -> None:
    bs, T = 4, 9
    attention, _ = masks([9, 6], [[], []], T)
    anchors = torch.tensor([[0, 3, 7], [5, 2, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    mask = block_attention_mask(anchors, valid, attention, bs, window)
    A = anchors.shape[1]
    assert mask.shape == (2, A * bs, T + A * bs)
    for b in range(2):
        for qa in range(A):
            for k in range(bs):
                q_pos = int(anchors[b, qa]) + k
                row = mask[b, qa * bs + k]
                for c in range(T):
                    want = bool(valid[b, qa]) and c < anchors[b, qa] and bool(attention[b, c])
                    if window is not None:
                        want = want and c > q_pos - window
                    assert bool(row[c]) == want, (b, qa, k, c)
                for ka in range(A):
                    for k2 in range(bs):
                        want = ka == qa
                        if window is not None:
                            want = want and int(anchors[b, ka]) + k2 > q_pos - window
                        assert bool(row[T + ka * bs + k2]) == want, (b, qa, k, ka, k2)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("gamma", [None, 2.5])
def test_labels_and_weights_follow_the_block_positions(shift: bool, gamma: float | None) -> None:
    bs, T = 4, 10
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(0))
    attention, loss = masks([10, 7], [[1, 2, 3, 4, 5, 7, 8, 9], [2, 3, 4, 5, 6]], T)
    anchors = torch.tensor([[1, 7], [4, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    D = bs if shift else bs - 1
    targets = block_targets(ids, loss, attention, anchors, valid, D, gamma)
    # the drafted positions in block-position terms, straight from the spec
    ks = range(0, bs) if shift else range(1, bs)
    for b in range(2):
        length = int(attention[b].sum())
        for a in range(2):
            anchor = int(anchors[b, a])
            for j, k in enumerate(ks):
                index = anchor + k + 1 if shift else anchor + k
                decay = 1.0
                if gamma is not None:
                    decay = math.exp(-k / gamma) if shift else math.exp(-(k - 1) / gamma)
                ok = bool(valid[b, a]) and index < length and bool(loss[b, index])
                assert bool(targets.supervised[b, a, j]) == ok
                assert targets.weights[b, a, j].item() == pytest.approx(decay * ok, rel=1e-6)
                if index < length:
                    assert targets.labels[b, a, j] == ids[b, index]
    prev = previous_tokens(ids, anchors, D)
    for j in range(D):  # the token just before each label
        assert prev[0, 0, j] == ids[0, 1 + j]
