"""The training position: what an optimizer step adds, and its round trip through a checkpoint."""

from __future__ import annotations

from typing import Any

from specforge_trainer.data import StreamBatch, StreamSample
from specforge_trainer.position import TrainingPosition, checkpoint_fields


def batch(epoch: int, items: list[tuple[int, int]]) -> StreamBatch:
    """A batch of (stream sequence, index in the epoch's order) samples; no tensors needed."""
    ref: Any = None
    return StreamBatch([StreamSample(seq=seq, epoch=epoch, ref=ref, tensors={}, index=index)
                        for seq, index in items])  # fmt: skip


def test_an_optimizer_step_advances_by_the_batches_it_trained() -> None:
    position = TrainingPosition()
    position.advance([batch(0, [(3, 0), (5, 1)]), batch(0, [(8, 2)])])
    assert position == TrainingPosition(global_step=1, samples_consumed=3, last_sequence=8,
                                        epoch=0, epoch_samples=3, epoch_index=2)  # fmt: skip
    # A window that crosses into the next epoch restarts the epoch's counters there.
    position.advance([batch(0, [(9, 3)]), batch(1, [(5, 0), (3, 1)])])
    assert position == TrainingPosition(global_step=2, samples_consumed=6, last_sequence=3,
                                        epoch=1, epoch_samples=2, epoch_index=1)  # fmt: skip
    # A zero-loss step (this rank's shard ran out) counts as a step and moves nothing else.
    position.advance([])
    assert position.global_step == 3 and position.samples_consumed == 6
    assert position.last_sequence == 3 and position.epoch_index == 1


def test_a_shuffled_later_epoch_resumes_after_the_last_index_trained() -> None:
    inside = TrainingPosition(epoch=2, epoch_samples=4, epoch_index=5, last_sequence=40)
    assert inside.start_index(shuffle_window=8) == 6
    assert inside.start_index(shuffle_window=1) == 0  # unshuffled: by sequence instead
    assert TrainingPosition(epoch=0, epoch_index=5).start_index(shuffle_window=8) == 0


def test_every_rank_gets_its_own_position_back_from_a_checkpoint() -> None:
    ranks = [TrainingPosition(7, 15, 31, 1, 3, 2), TrainingPosition(7, 14, 30, 1, 2, 1)]
    state = {"step": 7, **checkpoint_fields(ranks[0], [p.rank_entry() for p in ranks])}
    assert state["samples_consumed"] == 29 and state["global_step"] == 7
    assert state["last_sequence"] == 31 and state["last_sequence_by_rank"] == {"0": 31, "1": 30}
    assert [TrainingPosition.from_checkpoint(state, rank) for rank in (0, 1)] == ranks
