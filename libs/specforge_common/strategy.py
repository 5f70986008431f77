"""What every training strategy gives the trainer and the evaluator, whatever its algorithm.

A strategy (registered in ``registry.STRATEGIES``) turns one ``TrainBatch`` into a loss and raw
metric sums. The trainer owns the optimizer, accumulation, ranks and checkpoints; it only
calls the strategy, adds its metrics up and reads ``summary()``. So a new algorithm is a
strategy, a draft architecture and a capture method, and no service code changes.

Two loss conventions:

* ``loss_weight is None``: ``loss`` is a mean over the micro-batch; the trainer averages the
  micro-batches of an optimizer step (EAGLE-3).
* ``loss_weight`` set: ``loss`` is a weighted *sum* and ``loss_weight`` its total weight; the
  trainer divides the accumulated gradients by the weight summed over the whole accumulation
  window and all ranks, so the step's loss is ``sum(w * l) / sum(w)`` over everything it saw
  (block drafters, whose supervised positions per sample vary widely).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import torch

if TYPE_CHECKING:
    from .batch import TrainBatch
    from .contracts import RunSpec


class StrategyMetrics(Protocol):
    """Raw sums (float64 tensors) that add up over batches and ranks before ratios are taken."""

    def __add__(self, other: Self) -> Self: ...

    def tensors(self) -> list[torch.Tensor]:
        """The sums, in a fixed order, for an all-reduce."""
        ...

    def from_tensors(self, tensors: list[torch.Tensor]) -> Self:
        """Metrics of the same kind holding ``tensors`` (the all-reduced sums)."""
        ...

    def zero(self) -> Self:
        """Metrics of the same kind with every sum 0."""
        ...

    def supervised_positions(self) -> float:
        """How many supervised positions the sums cover (0: nothing was measured)."""
        ...

    def summary(self) -> dict[str, float]:
        """Ratios for logs and eval results: at least ``loss``, ``acc``, ``acc_{k}`` per
        drafted position and ``simulated_acc_len`` (accepted drafted tokens, no bonus)."""
        ...


@dataclass
class StrategyOutput:
    loss: torch.Tensor
    metrics: Any  # a StrategyMetrics
    loss_weight: torch.Tensor | None = None  # set: ``loss`` is a weighted sum (module doc)


class Strategy(Protocol):
    capture_method: ClassVar[str]  # the feature set it reads: "eagle3" | "dflash"
    weighted_loss: ClassVar[bool]  # its outputs carry ``loss_weight`` (module doc)

    @classmethod
    def from_spec(cls, spec: RunSpec, draft: torch.nn.Module, *, target_head: torch.Tensor,
                  target_embedding: torch.Tensor, total_steps: int | None) -> Self:  # fmt: skip
        """The strategy a run's spec asks for (``total_steps``: the optimizer steps of the run,
        for strategies with schedules; None where unknown, e.g. offline evaluation)."""
        ...

    def __call__(self, batch: TrainBatch) -> StrategyOutput: ...

    def set_step(self, step: int) -> None:
        """The optimizer step the next batches belong to (for loss schedules)."""
        ...

    def empty_metrics(self) -> StrategyMetrics: ...
