"""The draft vocabulary: which ``V_d`` of the target's ``V`` token ids the draft can propose.

The draft's ``lm_head`` has ``V_d`` rows; row ``i`` is target token ``i + d2t[i]``, and
``t2d[j]`` says whether target token ``j`` has a row. The map is built from token frequencies on
the supervised (loss-masked) positions of the training corpus, exactly as the reference does
(``docs/eagle3.md``, "The draft vocabulary"), so a draft trained here serves in SGLang with
the same ``d2t``/``t2d`` buffers.

A map is part of a draft's identity: ``lm_head`` rows mean nothing under a different map. Every
map therefore has a content ``hash()``, stored with each saved map and checkpoint, so resuming or
exporting with a different map fails loudly instead of scrambling the head.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from specforge_common.durable import write_atomic
from specforge_common.log import get_logger

if TYPE_CHECKING:
    from specforge_common.models.eagle3 import Eagle3Draft

__all__ = [
    "TokenCounter",
    "VocabMap",
    "VocabMapMismatch",
    "apply_vocab_map",
    "build_vocab_map",
    "vocab_map_of",
]

HASH_KEY = "vocab_map_hash"
# Maps saved by the reference implementation are pickles; read them only with weights_only.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

log = get_logger(component="eagle3.vocab")


class VocabMapMismatch(ValueError):
    """A vocabulary map is inconsistent, tampered with, or not the one a checkpoint was trained
    with."""


def _as_1d(name: str, value: torch.Tensor | Sequence[int]) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach()
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(tensor.shape)}")
    return tensor.cpu().contiguous()


@dataclass(frozen=True, eq=False)
class VocabMap:
    """``d2t`` int64 ``[V_d]`` (``target_id = draft_id + d2t[draft_id]``) and ``t2d`` bool ``[V]``.

    Construction only normalizes dtype/device; call ``validate()`` for the consistency checks
    (maps read from disk or applied to a draft are always validated).
    """

    d2t: torch.Tensor
    t2d: torch.Tensor

    def __post_init__(self) -> None:
        d2t = _as_1d("d2t", self.d2t)
        t2d = _as_1d("t2d", self.t2d)
        if d2t.is_floating_point() or d2t.is_complex() or d2t.dtype == torch.bool:
            raise ValueError(f"d2t must hold integer offsets, got dtype {d2t.dtype}")
        if t2d.dtype != torch.bool:
            raise ValueError(f"t2d must be a bool mask, got dtype {t2d.dtype}")
        object.__setattr__(self, "d2t", d2t.to(torch.int64))
        object.__setattr__(self, "t2d", t2d)

    @property
    def target_vocab_size(self) -> int:
        return self.t2d.shape[0]

    @property
    def draft_vocab_size(self) -> int:
        return self.d2t.shape[0]

    def hash(self) -> str:
        """Content hash (16 hex chars of sha256 over the sizes and the raw buffer bytes)."""
        digest = hashlib.sha256(f"{self.target_vocab_size}:{self.draft_vocab_size}:".encode())
        digest.update(self.d2t.numpy().astype("<i8", copy=False).tobytes())
        digest.update(self.t2d.numpy().tobytes())
        return digest.hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabMap):
            return NotImplemented
        return torch.equal(self.d2t, other.d2t) and torch.equal(self.t2d, other.t2d)

    def __hash__(self) -> int:
        return hash(self.hash())

    def __repr__(self) -> str:
        return (
            f"VocabMap(target_vocab_size={self.target_vocab_size}, "
            f"draft_vocab_size={self.draft_vocab_size}, hash={self.hash()})"
        )

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft token ids (any shape, any device)."""
        d2t = self.d2t.to(draft_ids.device)
        return draft_ids + d2t[draft_ids]

    def target_to_draft_ids(self) -> torch.Tensor:
        """The target ids that have a draft row, ascending: ``used[0..V_d-1]`` (row order)."""
        return torch.arange(self.draft_vocab_size, dtype=torch.int64) + self.d2t

    def validate(self) -> None:
        """Raise VocabMapMismatch unless ``t2d`` marks exactly the ids that ``d2t`` maps to."""
        V, V_d = self.target_vocab_size, self.draft_vocab_size
        if not 0 < V_d <= V:
            raise VocabMapMismatch(f"draft vocab size {V_d} must be in [1, target vocab size {V}]")
        marked = int(self.t2d.sum())
        if marked != V_d:
            raise VocabMapMismatch(
                f"t2d marks {marked} target ids but d2t has {V_d} entries; they must be equal"
            )
        used = self.target_to_draft_ids()
        outside = ((used < 0) | (used >= V)).nonzero().flatten()
        if outside.numel():
            i = int(outside[0])
            raise VocabMapMismatch(
                f"d2t maps draft id {i} to target id {int(used[i])}, outside [0, {V})"
            )
        not_ascending = (used[1:] <= used[:-1]).nonzero().flatten()
        if not_ascending.numel():
            i = int(not_ascending[0])
            raise VocabMapMismatch(
                f"d2t must map draft ids to strictly ascending target ids, but draft ids {i} and "
                f"{i + 1} map to {int(used[i])} and {int(used[i + 1])}"
            )
        unmarked = (~self.t2d[used]).nonzero().flatten()
        if unmarked.numel():
            i = int(unmarked[0])
            raise VocabMapMismatch(
                f"d2t maps draft id {i} to target id {int(used[i])}, which t2d does not mark"
            )

    @classmethod
    def identity(cls, vocab_size: int) -> VocabMap:
        """The map of a draft that keeps the whole target vocabulary (``V_d == V``)."""
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        return cls(
            d2t=torch.zeros(vocab_size, dtype=torch.int64),
            t2d=torch.ones(vocab_size, dtype=torch.bool),
        )

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (``d2t``, ``t2d``, hash in metadata) atomically."""
        self.validate()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": "pt",
            HASH_KEY: self.hash(),
            "target_vocab_size": str(self.target_vocab_size),
            "draft_vocab_size": str(self.draft_vocab_size),
        }
        write_atomic(path, safetensors_save({"d2t": self.d2t, "t2d": self.t2d}, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | Path) -> VocabMap:
        """Read a map written by ``save`` (hash verified), or a reference ``{"d2t", "t2d"}``
        torch file (``.pt``; read with ``weights_only=True``, no hash to verify)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab map {path} does not exist")
        if path.suffix in TORCH_SUFFIXES:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or not {"d2t", "t2d"} <= data.keys():
                raise VocabMapMismatch(f"vocab map {path} is not a dict with 'd2t' and 't2d'")
            vocab_map = cls(d2t=data["d2t"], t2d=data["t2d"])
            vocab_map.validate()
            return vocab_map
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                keys = set(f.keys())
                if not {"d2t", "t2d"} <= keys:
                    raise VocabMapMismatch(
                        f"vocab map {path} must hold 'd2t' and 't2d', found {sorted(keys)}"
                    )
                vocab_map = cls(d2t=f.get_tensor("d2t"), t2d=f.get_tensor("t2d"))
        except VocabMapMismatch:
            raise
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise VocabMapMismatch(f"cannot read vocab map {path}: {exc}") from exc
        stored = metadata.get(HASH_KEY)
        if stored is None:
            raise VocabMapMismatch(f"vocab map {path} has no {HASH_KEY!r} in its metadata")
        if stored != vocab_map.hash():
            raise VocabMapMismatch(
                f"vocab map {path} was modified: its contents hash to {vocab_map.hash()} but "
                f"it was saved with hash {stored}"
            )
        vocab_map.validate()
        return vocab_map


class TokenCounter:
    """Token frequencies over loss-masked positions; ``counts`` keeps first-seen order, which
    is how ``build_vocab_map`` breaks frequency ties (as ``Counter.most_common`` does)."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    @property
    def num_tokens(self) -> int:
        """Supervised tokens counted so far."""
        return sum(self.counts.values())

    def update(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        loss_mask: Sequence[int] | torch.Tensor,
        max_length: int | None = None,
    ) -> None:
        """Count ``input_ids[loss_mask == 1]`` after truncating both to ``max_length``.

        Accepts one sequence or a batch (the last dimension is the sequence).
        """
        ids = torch.as_tensor(input_ids).detach().cpu()
        mask = torch.as_tensor(loss_mask).detach().cpu()
        if ids.shape != mask.shape:
            raise ValueError(
                f"input_ids shape {tuple(ids.shape)} != loss_mask shape {tuple(mask.shape)}"
            )
        if ids.dim() == 0:
            raise ValueError("input_ids must have at least one dimension")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if max_length is not None:
            if max_length < 0:
                raise ValueError(f"max_length must be non-negative, got {max_length}")
            ids, mask = ids[..., :max_length], mask[..., :max_length]
        selected = ids.reshape(-1)[mask.reshape(-1) == 1].to(torch.int64)
        if selected.numel() == 0:
            return
        # Vectorized count that still inserts new ids in first-seen order.
        unique, inverse, counts = torch.unique(selected, return_inverse=True, return_counts=True)
        positions = torch.arange(selected.numel())
        first = torch.full_like(unique, selected.numel()).scatter_reduce_(
            0, inverse, positions, reduce="amin"
        )
        order = first.argsort()
        for token, count in zip(unique[order].tolist(), counts[order].tolist(), strict=True):
            self.counts[token] += count


def build_vocab_map(
    counts: Counter[int], target_vocab_size: int, draft_vocab_size: int
) -> VocabMap:
    """The reference algorithm: top-``V_d`` ids by frequency (ties: first seen), padded with
    ids ``0, 1, 2, ...`` when fewer were seen, sorted ascending."""
    V, V_d = target_vocab_size, draft_vocab_size
    if V <= 0 or V_d <= 0:
        raise ValueError(f"vocab sizes must be positive, got target {V} and draft {V_d}")
    if V_d > V:
        raise ValueError(f"draft vocab size {V_d} exceeds the target vocab size {V}")
    outside = [token for token in counts if not 0 <= token < V]
    if outside:
        raise ValueError(
            f"{len(outside)} counted token ids are outside [0, {V}) (target vocab size), "
            f"e.g. {outside[:5]}; wrong tokenizer or an unmasked padding id?"
        )
    total = sum(counts.values())
    if V_d == V:
        log.info("draft vocab is the whole target vocab", vocab_size=V, coverage=1.0)
        return VocabMap.identity(V)
    table = Counter(counts)  # same insertion order; never mutate the caller's counts
    if len(table) < V_d:
        for token in range(V_d):
            if token not in table:
                table[token] = 0
                if len(table) >= V_d:
                    break
    top = table.most_common(V_d)
    covered = sum(freq for _, freq in top)
    used = torch.tensor(sorted(token for token, _ in top), dtype=torch.int64)
    d2t = used - torch.arange(V_d, dtype=torch.int64)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    vocab_map = VocabMap(d2t=d2t, t2d=t2d)
    log.info(
        "built draft vocab map",
        target_vocab_size=V,
        draft_vocab_size=V_d,
        distinct_tokens_seen=len(counts),
        counted_tokens=total,
        coverage=round(covered / total, 6) if total else 0.0,
        vocab_map_hash=vocab_map.hash(),
    )
    return vocab_map


def stored_tensors(vocab_map: VocabMap, counts: Counter[int]) -> dict[str, torch.Tensor]:
    """What a run stores as its vocab map: ``d2t``/``t2d`` and the token counts it came from
    (first-seen order kept), so a replay can build a map of another draft size by the same
    rule."""
    return {
        "d2t": vocab_map.d2t,
        "t2d": vocab_map.t2d,
        "count_ids": torch.tensor(list(counts), dtype=torch.int64),
        "count_values": torch.tensor(list(counts.values()), dtype=torch.int64),
    }


def from_stored(tensors: dict[str, torch.Tensor], draft_vocab_size: int) -> VocabMap:
    """The stored map, or the map of ``draft_vocab_size`` built from the stored counts."""
    vocab_map = VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"])
    vocab_map.validate()
    if vocab_map.draft_vocab_size == draft_vocab_size or "count_ids" not in tensors:
        return vocab_map
    ids, values = tensors["count_ids"].tolist(), tensors["count_values"].tolist()
    counts = Counter(dict(zip(ids, values, strict=True)))
    return build_vocab_map(counts, vocab_map.target_vocab_size, draft_vocab_size)


def apply_vocab_map(draft: Eagle3Draft, vocab_map: VocabMap) -> None:
    """Copy a (validated) map into the draft's ``d2t``/``t2d`` buffers, in place."""
    vocab_map.validate()
    if tuple(draft.t2d.shape) != (vocab_map.target_vocab_size,):
        raise VocabMapMismatch(
            f"vocab map is for a target vocab of {vocab_map.target_vocab_size} tokens but the "
            f"draft's t2d has shape {tuple(draft.t2d.shape)} (config vocab_size)"
        )
    if tuple(draft.d2t.shape) != (vocab_map.draft_vocab_size,):
        raise VocabMapMismatch(
            f"vocab map has {vocab_map.draft_vocab_size} draft tokens but the draft's d2t has "
            f"shape {tuple(draft.d2t.shape)} (config draft_vocab_size)"
        )
    with torch.no_grad():
        draft.d2t.copy_(vocab_map.d2t)
        draft.t2d.copy_(vocab_map.t2d)


def vocab_map_of(draft: Eagle3Draft) -> VocabMap:
    """A CPU copy of the map currently in a draft's buffers (not validated)."""
    return VocabMap(d2t=draft.d2t.detach().cpu().clone(), t2d=draft.t2d.detach().cpu().clone())
