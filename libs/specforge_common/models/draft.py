"""What the trainer, its checkpoints and the evaluator need of every draft architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class DraftModel(nn.Module):
    """Base of the registered draft architectures (``registry.DRAFT_ARCHITECTURES``).

    ``config_class.from_target(target_config, draft_vocab_size=..., aux_layer_ids=...,
    **overrides)`` sizes a fresh draft from its target; ``attach_target`` wires it to the
    target's frozen pieces; ``save`` writes the layout users serve with.
    """

    config_class: ClassVar[type]
    config: Any

    def attach_target(self, embedding: torch.Tensor, vocab_map: Any) -> None:
        """Wire a fresh draft to its target (embedding copy, draft vocabulary). Drafts that hold
        nothing of the target's need nothing."""

    def save(self, directory: str | Path) -> None:
        """Export to ``directory`` in the layout its serving engine loads."""
        raise NotImplementedError(f"{type(self).__name__} has no export")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The exported weights."""
        return self.state_dict()
