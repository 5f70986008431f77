"""What a training strategy consumes: one right-padded batch of captured samples."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    loss_mask: torch.Tensor  # [B, T] 1 = supervised (assistant) token, 0 on padding
    aux_hidden_states: torch.Tensor  # [B, T, 3 H_t] outputs of the three aux target layers
    hidden_states: torch.Tensor  # [B, T, H_t] final (post-norm) target hidden state

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TrainBatch:
        """Move to ``device``; ``dtype`` applies to the float features only."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dtype is not None and value.is_floating_point():
                value = value.to(device=device, dtype=dtype, non_blocking=True)
            else:
                value = value.to(device=device, non_blocking=True)
            moved[f.name] = value
        return TrainBatch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())
