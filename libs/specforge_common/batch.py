"""What a training strategy consumes: one right-padded batch of captured samples, and the
layout of one captured sample (the tensors capture stores per sample, no batch dim).

The tensors depend on the capture method (``FEATURE_KEYS_BY_METHOD``): ``eagle3`` stores the
aux layers and the final hidden state; ``dflash`` stores only its target layers (in
``aux_hidden_states``), as block drafters read neither the final hidden state nor logits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch.nn.utils.rnn import pad_sequence

FEATURE_KEYS = ("input_ids", "loss_mask", "aux_hidden_states", "hidden_states")
FEATURE_KEYS_BY_METHOD: dict[str, tuple[str, ...]] = {
    "eagle3": FEATURE_KEYS,
    "dflash": ("input_ids", "loss_mask", "aux_hidden_states"),
}


def feature_keys(method: str) -> tuple[str, ...]:
    """The tensors a sample of capture method ``method`` holds."""
    try:
        return FEATURE_KEYS_BY_METHOD[method]
    except KeyError:
        known = ", ".join(sorted(FEATURE_KEYS_BY_METHOD))
        raise ValueError(f"unknown capture method {method!r}; known: {known}") from None


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    loss_mask: torch.Tensor  # [B, T] 1 = supervised (assistant) token, 0 on padding
    aux_hidden_states: torch.Tensor  # [B, T, n H_t] outputs of the captured target layers
    hidden_states: torch.Tensor | None = None  # [B, T, H_t] final (post-norm); eagle3 only
    # [B] int64, one per sample: a pure function of (run seed, prompt id, epoch), for strategies
    # that draw at random per sample (block anchors), so resume and replay draw the same
    seeds: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TrainBatch:
        """Move to ``device``; ``dtype`` applies to the float features only."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                moved[f.name] = None
                continue
            if dtype is not None and value.is_floating_point():
                value = value.to(device=device, dtype=dtype, non_blocking=True)
            else:
                value = value.to(device=device, non_blocking=True)
            moved[f.name] = value
        return TrainBatch(**moved)

    def rows(self, index: slice) -> TrainBatch:
        """The batch of rows ``index`` (absent tensors stay absent)."""
        return TrainBatch(**{f.name: None if getattr(self, f.name) is None
                             else getattr(self, f.name)[index] for f in fields(self)})  # fmt: skip

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def sample_seed(run_seed: int, prompt_id: str, epoch: int) -> int:
    """The seed of one sample's random draws in one epoch: the same on resume and replay, on
    any rank, in any batch, and whatever the store (the prompt id, not the sample id, which
    carries the run-spec hash)."""
    digest = hashlib.sha256(f"{run_seed}:{prompt_id}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleError(ValueError):
    """A sample's tensors do not have the layout capture promises (keys, ranks, lengths)."""


def check_sample(
    tensors: Mapping[str, torch.Tensor],
    *,
    aux_size: int | None = None,
    hidden_size: int | None = None,
    method: str = "eagle3",
) -> int:
    """Validate one stored sample (no batch dim) of capture method ``method``; return ``T``."""
    missing = [k for k in feature_keys(method) if k not in tensors]
    if missing:
        raise SampleError(f"sample is missing tensors {missing} (has {sorted(tensors)})")
    ids, mask = tensors["input_ids"], tensors["loss_mask"]
    aux = tensors["aux_hidden_states"]
    if ids.dim() != 1 or ids.shape[0] == 0:
        raise SampleError(f"input_ids must be a non-empty 1-D tensor, got {tuple(ids.shape)}")
    if ids.is_floating_point() or mask.is_floating_point():
        raise SampleError("input_ids and loss_mask must be integer tensors")
    T = ids.shape[0]
    if tuple(mask.shape) != (T,):
        raise SampleError(f"loss_mask has shape {tuple(mask.shape)}, expected ({T},)")
    if aux.dim() != 2 or aux.shape[0] != T:
        raise SampleError(f"aux_hidden_states has shape {tuple(aux.shape)}, expected ({T}, nH)")
    if aux_size is not None and aux.shape[1] != aux_size:
        raise SampleError(f"aux_hidden_states width {aux.shape[1]} != {aux_size} the draft takes")
    hidden = tensors.get("hidden_states")
    if hidden is not None and (hidden.dim() != 2 or hidden.shape[0] != T):
        raise SampleError(f"hidden_states has shape {tuple(hidden.shape)}, expected ({T}, H)")
    if hidden is not None and hidden_size is not None and hidden.shape[1] != hidden_size:
        raise SampleError(f"hidden_states width {hidden.shape[1]} != target hidden {hidden_size}")
    return T


def collate(
    samples: Sequence[Mapping[str, torch.Tensor]], seeds: Sequence[int] | None = None
) -> TrainBatch:
    """Right-pad samples to the longest: ids, masks and features 0 at padding, ``[B, T, ...]``.
    ``hidden_states`` is there when every sample has it (eagle3 captures)."""
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
        hidden_states=pad("hidden_states") if all("hidden_states" in s for s in samples) else None,
        seeds=None if seeds is None else torch.tensor(list(seeds), dtype=torch.int64),
    )
