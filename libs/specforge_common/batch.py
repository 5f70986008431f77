"""What a training strategy consumes: one right-padded batch of captured samples, and the
layout of one captured sample (the tensors capture stores per sample, no batch dim)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch.nn.utils.rnn import pad_sequence

FEATURE_KEYS = ("input_ids", "loss_mask", "aux_hidden_states", "hidden_states")


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


class SampleError(ValueError):
    """A sample's tensors do not have the layout capture promises (keys, ranks, lengths)."""


def check_sample(
    tensors: Mapping[str, torch.Tensor],
    *,
    aux_size: int | None = None,
    hidden_size: int | None = None,
) -> int:
    """Validate one stored sample (no batch dim); return its length ``T``."""
    missing = [k for k in FEATURE_KEYS if k not in tensors]
    if missing:
        raise SampleError(f"sample is missing tensors {missing} (has {sorted(tensors)})")
    ids, mask = tensors["input_ids"], tensors["loss_mask"]
    aux, hidden = tensors["aux_hidden_states"], tensors["hidden_states"]
    if ids.dim() != 1 or ids.shape[0] == 0:
        raise SampleError(f"input_ids must be a non-empty 1-D tensor, got {tuple(ids.shape)}")
    if ids.is_floating_point() or mask.is_floating_point():
        raise SampleError("input_ids and loss_mask must be integer tensors")
    T = ids.shape[0]
    if tuple(mask.shape) != (T,):
        raise SampleError(f"loss_mask has shape {tuple(mask.shape)}, expected ({T},)")
    if aux.dim() != 2 or aux.shape[0] != T:
        raise SampleError(f"aux_hidden_states has shape {tuple(aux.shape)}, expected ({T}, 3H)")
    if hidden.dim() != 2 or hidden.shape[0] != T:
        raise SampleError(f"hidden_states has shape {tuple(hidden.shape)}, expected ({T}, H)")
    if aux_size is not None and aux.shape[1] != aux_size:
        raise SampleError(f"aux_hidden_states width {aux.shape[1]} != {aux_size} the draft takes")
    if hidden_size is not None and hidden.shape[1] != hidden_size:
        raise SampleError(f"hidden_states width {hidden.shape[1]} != target hidden {hidden_size}")
    return T


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> TrainBatch:
    """Right-pad samples to the longest: ids, masks and features 0 at padding, ``[B, T, ...]``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")

    def pad(key: str) -> torch.Tensor:
        return pad_sequence([s[key] for s in samples], batch_first=True, padding_value=0)

    lengths = torch.tensor([s["input_ids"].shape[0] for s in samples])
    T = int(lengths.max())
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    return TrainBatch(
        input_ids=pad("input_ids").to(torch.int64),
        attention_mask=attention_mask,
        loss_mask=pad("loss_mask").to(torch.int64),
        aux_hidden_states=pad("aux_hidden_states"),
        hidden_states=pad("hidden_states"),
    )
