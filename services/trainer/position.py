"""Where a rank's training stands: what its weights have seen, as counters a checkpoint stores.

The position moves only at an optimizer step, by the batches that step trained, so a dropped
partial accumulation window (a stop mid-window) is not part of it and a resume re-reads it.
A checkpoint holds every rank's position (rank 0 gathers them); a resumed rank takes back its
own and reads the samples log from ``last_sequence + 1`` in ``epoch``, so the batches after the
resume are the ones the uninterrupted run would have formed. With ``train.shuffle_window > 1``
the epochs after the first are shuffled (``data.SampleStream``, seeded by ``spec.seed``); a
resume inside such an epoch skips by ``epoch_index`` (the index of the last trained sample in
that epoch's order) instead of the sequence: ``start_index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data import StreamBatch

__all__ = ["TrainingPosition", "checkpoint_fields"]

# The per-rank fields of a checkpoint state, each stored as ``<name>_by_rank``.
RANK_FIELDS = ("last_sequence", "samples_consumed", "epoch", "epoch_samples", "epoch_index")


@dataclass
class TrainingPosition:
    """One rank's position; rank 0's ``global_step`` is every rank's (they step together)."""

    global_step: int = 0  # optimizer steps taken
    samples_consumed: int = 0  # samples this rank's optimizer steps trained on
    last_sequence: int = 0  # samples-stream sequence of the last of them
    epoch: int = 0  # the epoch of the last of them
    epoch_samples: int = 0  # samples trained in that epoch
    epoch_index: int = -1  # index of the last of them in that epoch's order

    def advance(self, batches: Sequence[StreamBatch]) -> None:
        """One optimizer step over ``batches`` (none: a zero-loss step of an exhausted rank)."""
        self.global_step += 1
        self.samples_consumed += sum(batch.num_samples for batch in batches)
        for batch in batches:
            if batch.epoch != self.epoch:
                self.epoch, self.epoch_samples, self.epoch_index = batch.epoch, 0, -1
            self.epoch_samples += batch.num_samples
            self.epoch_index = batch.samples[-1].index
        if batches:
            self.last_sequence = batches[-1].last_sequence

    def rank_entry(self) -> dict[str, int]:
        """This rank's part of a checkpoint, gathered on rank 0 (``checkpoint_fields``)."""
        return {"last_sequence": self.last_sequence, "samples_consumed": self.samples_consumed,
                "epoch": self.epoch, "epoch_samples": self.epoch_samples,
                "epoch_index": self.epoch_index}  # fmt: skip

    def start_index(self, shuffle_window: int) -> int:
        """Where the stream starts in the first epoch's order. Epoch 0 is read in stream order
        from ``last_sequence + 1``; a shuffled later epoch goes on after the last index the
        weights saw."""
        if shuffle_window > 1 and self.epoch > 0:
            return self.epoch_index + 1
        return 0

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], rank: int) -> TrainingPosition:
        """Rank ``rank``'s position in a checkpoint state written by ``checkpoint_fields``."""
        me = str(rank)
        fields = {name: int(state[f"{name}_by_rank"][me]) for name in RANK_FIELDS}
        return cls(global_step=int(state["step"]), **fields)


def checkpoint_fields(position: TrainingPosition, entries: list[dict[str, int]]) -> dict[str, Any]:
    """The position part of a checkpoint state: rank 0's ``position`` and every rank's
    ``rank_entry`` (in rank order), each field by rank; ``samples_consumed`` is their sum."""
    by_rank = {str(rank): entry for rank, entry in enumerate(entries)}
    fields: dict[str, Any] = {
        "global_step": position.global_step,
        "samples_consumed": sum(entry["samples_consumed"] for entry in entries),
        "last_sequence": position.last_sequence,
        "epoch": position.epoch,
        "epoch_samples": position.epoch_samples,
    }
    for name in RANK_FIELDS:
        fields[f"{name}_by_rank"] = {rank: entry[name] for rank, entry in by_rank.items()}
    return fields
