"""Block drafters' telemetry: raw float64 sums that add up over batches and ranks.

Per drafted position ``j``, a block *reaches* ``j`` when ``j`` is supervised and every earlier
drafted position was supervised and predicted right; ``acc_{j}`` is the share of reaching
blocks that get ``j`` right too (the conditional acceptance of greedy verification). A block's
accepted prefix is its count of leading right predictions, stopping at the first wrong or
unsupervised position; ``simulated_acc_len`` is its mean over valid blocks (no bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self

import torch


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den)
    return float(num) / d if d > 0 else 0.0


@dataclass
class BlockMetrics:
    loss: torch.Tensor  # sum over positions of w * loss
    weight: torch.Tensor  # sum of w
    position_loss: torch.Tensor  # [D] sum of w * loss at drafted position j
    position_weight: torch.Tensor  # [D] sum of w at j
    correct: torch.Tensor  # right argmax at supervised positions
    supervised: torch.Tensor  # supervised positions
    reached: torch.Tensor  # [D] blocks reaching j
    reached_correct: torch.Tensor  # [D] of those, right at j
    accepted: torch.Tensor  # sum over valid blocks of the accepted prefix length
    blocks: torch.Tensor  # valid blocks

    @classmethod
    def zeros(cls, num_drafted: int) -> Self:
        shapes = {"position_loss", "position_weight", "reached", "reached_correct"}
        return cls(**{
            f.name: torch.zeros(num_drafted if f.name in shapes else (), dtype=torch.float64)
            for f in fields(cls)
        })  # fmt: skip

    @staticmethod
    def count(
        losses: torch.Tensor,
        predicted: torch.Tensor,
        labels: torch.Tensor,
        supervised: torch.Tensor,
        weights: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The base sums for blocks [N, D]: ``losses`` the per-position objective."""
        hit = (predicted == labels) & supervised
        prefix = hit.long().cumprod(dim=1).bool()  # positions 0..j all supervised and right
        before = torch.ones_like(prefix)
        before[:, 1:] = prefix[:, :-1]
        weighted = weights.double() * losses.detach().double()
        sums = {
            "loss": weighted.sum(),
            "weight": weights.double().sum(),
            "position_loss": weighted.sum(0),
            "position_weight": weights.double().sum(0),
            "correct": hit.double().sum(),
            "supervised": supervised.double().sum(),
            "reached": (before & supervised).double().sum(0),
            "reached_correct": prefix.double().sum(0),
            "accepted": prefix.double().sum(),
            "blocks": torch.tensor(float(labels.shape[0]), dtype=torch.float64),
        }
        return {k: v.detach().cpu() for k, v in sums.items()}

    @classmethod
    def measure(
        cls,
        losses: torch.Tensor,
        predicted: torch.Tensor,
        labels: torch.Tensor,
        supervised: torch.Tensor,
        weights: torch.Tensor,
    ) -> Self:
        return cls(**cls.count(losses, predicted, labels, supervised, weights))

    def __add__(self, other: Self) -> Self:
        return self.from_tensors(
            [a + b for a, b in zip(self.tensors(), other.tensors(), strict=True)]
        )

    def tensors(self) -> list[torch.Tensor]:
        """The sums in field order (``from_tensors`` takes them back)."""
        return [getattr(self, f.name) for f in fields(self)]

    def from_tensors(self, tensors: list[torch.Tensor]) -> Self:
        return type(self)(*tensors)

    def zero(self) -> Self:
        return self.from_tensors([torch.zeros_like(t) for t in self.tensors()])

    def supervised_positions(self) -> float:
        return float(self.supervised)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {
            "loss": _ratio(self.loss, self.weight),
            "acc": _ratio(self.correct, self.supervised),
            "simulated_acc_len": _ratio(self.accepted, self.blocks),
        }
        for j in range(self.reached.numel()):
            out[f"acc_{j}"] = _ratio(self.reached_correct[j], self.reached[j])
            out[f"ploss_{j}"] = _ratio(self.position_loss[j], self.position_weight[j])
        return out


@dataclass
class DominoMetrics(BlockMetrics):
    """Adds the backbone-only logits' accuracy and the two loss terms separately."""

    base_correct: torch.Tensor  # right base-logits argmax at supervised positions
    final_loss: torch.Tensor  # sum of w * CE(final)
    base_loss: torch.Tensor  # sum of w * CE(base)

    @classmethod
    def measure_domino(
        cls,
        losses: torch.Tensor,
        final_ce: torch.Tensor,
        base_ce: torch.Tensor,
        predicted: torch.Tensor,
        base_predicted: torch.Tensor,
        labels: torch.Tensor,
        supervised: torch.Tensor,
        weights: torch.Tensor,
    ) -> Self:
        w = weights.double()
        return cls(
            **cls.count(losses, predicted, labels, supervised, weights),
            base_correct=((base_predicted == labels) & supervised).double().sum().cpu(),
            final_loss=(w * final_ce.detach().double()).sum().cpu(),
            base_loss=(w * base_ce.detach().double()).sum().cpu(),
        )

    def summary(self) -> dict[str, float]:
        out = super().summary()
        out["base_acc"] = _ratio(self.base_correct, self.supervised)
        out["accept_len"] = _ratio(self.accepted + self.blocks, self.blocks)
        out["final_loss"] = _ratio(self.final_loss, self.weight)
        out["base_loss"] = _ratio(self.base_loss, self.weight)
        return out
