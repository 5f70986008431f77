"""Learning-rate schedule: linear warmup, then cosine to 0 (or flat), as a pure function of the
optimizer step, so a resumed run needs nothing but the step to be back on the same curve.

    step <  W:  lr * (step + 1) / W
    cosine:     lr * 0.5 * (1 + cos(pi * min(1, (step - W) / max(1, N - W))))
    constant:   lr

with ``W = int(warmup_ratio * N)`` and ``N`` the total number of optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from specforge_common.contracts import TrainSpec

__all__ = ["LRSchedule", "lr_at", "total_optimizer_steps", "warmup_steps"]

SchedulerKind = Literal["cosine", "constant"]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return max(0, int(warmup_ratio * total_steps))


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup: int,
    scheduler: SchedulerKind = "cosine",
) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if scheduler == "constant":
        return base_lr
    if scheduler != "cosine":
        raise ValueError(f"unknown scheduler {scheduler!r}; known: cosine, constant")
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_optimizer_steps(train: TrainSpec, num_train_samples: int) -> int:
    """``train.total_steps``, else ``ceil(ceil(samples / batch) * epochs / accumulation)``.

    Batches never span epochs, so each epoch has ``ceil(samples / batch_size)`` micro-batches;
    a trailing partial accumulation window still makes an optimizer step (hence the outer ceil).
    """
    if train.total_steps is not None:
        return max(1, train.total_steps)
    micro_batches = math.ceil(max(0, num_train_samples) / train.batch_size) * train.epochs
    return max(1, math.ceil(micro_batches / max(1, train.accumulation_steps)))


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup: int
    scheduler: SchedulerKind = "cosine"

    @classmethod
    def from_train_spec(cls, train: TrainSpec, total_steps: int) -> LRSchedule:
        return cls(train.learning_rate, total_steps, warmup_steps(total_steps, train.warmup_ratio),
                   train.scheduler)  # fmt: skip

    def __call__(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps, warmup=self.warmup,
                     scheduler=self.scheduler)  # fmt: skip
