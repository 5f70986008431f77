"""Offline metrics of a draft on captured eval samples: per-position accuracy and acceptance.

The draft runs its training strategy's forward (``evaluate_strategy``: any algorithm; for
EAGLE-3 the training-time-test unroll, ``evaluate_draft``), without gradients, over
right-padded batches of the stored sample tensors. Block drafters draw their anchors from each
sample's seed, so every checkpoint is scored on the same blocks. ``Eagle3Metrics`` keeps raw
sums, so the counts (correct and supervised positions, expected acceptance and the positions it
is averaged over) do not depend on how the samples are batched. ``ploss_k`` and ``loss`` in
``summary()`` are normalised by all B*T positions, padding included (the training convention),
so those two depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

# The trainer's collate, so a sample is batched the same way in training and evaluation: right
# padding with 0 in ids, masks and features (0 is also what the EAGLE shift puts after a
# sequence's last token, so a sample scores the same alone as in any padded batch).
from specforge_common.batch import collate
from specforge_common.eagle3 import Eagle3Metrics, Eagle3Strategy
from specforge_common.models.eagle3 import AttentionBackend, Eagle3Draft
from specforge_common.strategy import Strategy, StrategyMetrics

__all__ = ["collate", "evaluate_draft", "evaluate_strategy"]


@torch.no_grad()
def evaluate_strategy(
    strategy: Strategy,
    draft: torch.nn.Module,
    samples: Sequence[Mapping[str, Tensor]],
    *,
    batch_size: int,
    seeds: Sequence[int] | None = None,
) -> StrategyMetrics:
    """Summed metrics of ``strategy`` (over ``draft``) on ``samples``, in order, ``batch_size``
    at a time; ``seeds``: one per sample (``batch.sample_seed``) for strategies that draw.

    The draft is put in eval mode for the call and its previous mode restored. Zero samples
    give zero sums: callers must treat that as "no data", not as zero accuracy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(draft.parameters()).device
    total = strategy.empty_metrics()
    was_training = draft.training
    draft.eval()
    try:
        for start in range(0, len(samples), batch_size):
            rows = slice(start, start + batch_size)
            batch = collate(samples[rows], seeds=None if seeds is None else seeds[rows])
            total = total + strategy(batch.to(device)).metrics
    finally:
        draft.train(was_training)
    return total


@torch.no_grad()
def evaluate_draft(
    draft: Eagle3Draft,
    target_head: Tensor,
    samples: Sequence[Mapping[str, Tensor]],
    *,
    ttt_length: int,
    batch_size: int,
    attention: AttentionBackend = "sdpa",
) -> Eagle3Metrics:
    """Summed EAGLE-3 metrics of ``draft`` over ``samples``, in order, ``batch_size`` at a time.

    The batches go to the draft's device; the draft is put in eval mode for the call and its
    previous mode restored. Zero samples give ``Eagle3Metrics.zeros`` (all counts 0): callers
    must treat that as "no data", not as zero accuracy.
    """
    strategy = Eagle3Strategy(draft, target_head, ttt_length=ttt_length, attention=attention)
    return evaluate_strategy(strategy, draft, samples, batch_size=batch_size)
