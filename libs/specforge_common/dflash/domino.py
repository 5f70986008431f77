"""The Domino training strategy: DFlash's blocks, loss mixed between corrected and base logits.

``loss = (1 - lambda) * CE(final) + lambda * CE(base)`` per drafted position, with the DFlash
weights. ``lambda`` decays linearly from ``lambda_base_start`` to 0 over ``total_steps *
lambda_base_decay_ratio`` optimizer steps (a curriculum: the parallel backbone first, then the
causal correction), so a decaying schedule needs the run's horizon.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..models.domino import DominoDraft
from ..registry import STRATEGIES
from .metrics import DominoMetrics
from .strategy import DFlashStrategy, DraftedBlocks, run_chunked


def lambda_schedule(step: int, total_steps: int | None, start: float, decay_ratio: float) -> float:
    """``clamp(start * (1 - step / (total_steps * decay_ratio)), 0, 1)``; a ratio <= 0 is a
    horizon of zero steps (already decayed: 0)."""
    if decay_ratio <= 0:
        return 0.0
    check_horizon(total_steps, decay_ratio)
    horizon = float(total_steps) * decay_ratio  # type: ignore[arg-type]
    return min(1.0, max(0.0, start * (1.0 - step / horizon)))


def check_horizon(total_steps: int | None, decay_ratio: float) -> None:
    if decay_ratio > 0 and (total_steps is None or total_steps <= 0):
        raise ValueError(
            f"Domino's lambda_base decays over total_steps * lambda_base_decay_ratio "
            f"({decay_ratio}) optimizer steps, but the run's total_steps is {total_steps!r}: "
            "give the run a horizon (train.total_steps / a known sample count) or set "
            "lambda_base_decay_ratio to 0"
        )


@STRATEGIES.register("domino")
class DominoStrategy(DFlashStrategy):
    knobs: ClassVar[tuple[str, ...]] = DFlashStrategy.knobs + (
        "lambda_base_start", "lambda_base_decay_ratio",
    )  # fmt: skip
    draft: DominoDraft

    def __init__(
        self,
        draft: DominoDraft,
        target_head: torch.Tensor,
        target_embedding: torch.Tensor,
        *,
        total_steps: int | None,
        lambda_base_start: float = 1.0,
        lambda_base_decay_ratio: float = 1.0,
        **dflash: Any,
    ) -> None:
        super().__init__(draft, target_head, target_embedding, **dflash)
        check_horizon(total_steps, lambda_base_decay_ratio)
        self.total_steps = total_steps
        self.lambda_base_start = lambda_base_start
        self.lambda_base_decay_ratio = lambda_base_decay_ratio

    @classmethod
    def strategy_kwargs(cls, config: Any, total_steps: int | None) -> dict[str, Any]:
        return super().strategy_kwargs(config, total_steps) | {"total_steps": total_steps}

    @property
    def lambda_base(self) -> float:
        """The base-loss share at the current optimizer step."""
        return lambda_schedule(self.step, self.total_steps, self.lambda_base_start,
                               self.lambda_base_decay_ratio)  # fmt: skip

    def empty_metrics(self) -> DominoMetrics:
        return DominoMetrics.zeros(self.draft.config.num_drafted)

    def objective(self, blocks: DraftedBlocks) -> tuple[torch.Tensor, DominoMetrics]:
        if blocks.labels.shape[0] == 0:
            return self._graph_zero(), self.empty_metrics()
        draft, head, lam = self.draft, self.target_head, self.lambda_base
        prev_embeds = F.embedding(blocks.prev_ids, self.target_embedding)
        states = draft.prefix_states(prev_embeds)  # small; the GRU runs once, outside the chunks

        def chunk(hidden: torch.Tensor, states: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
            base, final = draft.corrected_logits(hidden, states, head)
            flat = labels.flatten()
            base_ce = F.cross_entropy(base.flatten(0, 1), flat, reduction="none").view_as(labels)
            final_ce = F.cross_entropy(final.flatten(0, 1), flat, reduction="none").view_as(labels)
            mixed = (1.0 - lam) * final_ce + lam * base_ce
            return ((mixed * weights).sum(), mixed.detach(), final_ce.detach(), base_ce.detach(),
                    final.detach().argmax(-1), base.detach().argmax(-1))  # fmt: skip

        loss, mixed, final_ce, base_ce, predicted, base_predicted = run_chunked(
            chunk, (blocks.hidden, states, blocks.labels, blocks.weights),
            self.objective_chunk_blocks,
        )  # fmt: skip
        metrics = DominoMetrics.measure_domino(
            mixed, final_ce, base_ce, predicted, base_predicted,
            blocks.labels, blocks.supervised, blocks.weights,
        )  # fmt: skip
        return loss, metrics
