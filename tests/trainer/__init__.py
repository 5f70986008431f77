"""Helpers shared by the trainer tests (fixtures live in each module)."""

from __future__ import annotations

from typing import Any

import nats.js.errors

from specforge_common.bus import Bus
from specforge_common.contracts import EndOfSplit, SampleRef, TrainSpec, decode
from specforge_common.subjects import RunSubjects, StreamKind

FAST_TRAIN = dict(learning_rate=3e-3, ttt_length=3, warmup_ratio=0.0, checkpoint_every=4,
                  log_every=1, batch_size=2)  # fmt: skip


def train_spec(**over: Any) -> TrainSpec:
    """The tiny-run TrainSpec of ``tests.support.tiny_run_spec`` with some fields changed."""
    return TrainSpec(**(FAST_TRAIN | over))


async def stream_records(bus: Bus, run_id: str, kind: StreamKind, record_type: Any) -> list:
    """Every ``(seq, record)`` stored in one of a run's streams, in order."""
    stream = RunSubjects(run_id).stream(kind)
    info = await bus.js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append((seq, decode(msg.data, record_type, subject=msg.subject)))
    return out


async def drop_end_markers(bus: Bus, run_id: str) -> None:
    """Delete the EndOfSplit markers: the samples log then looks like capture is still running."""
    stream = RunSubjects(run_id).stream("samples")
    for seq, record in await stream_records(bus, run_id, "samples", SampleRef | EndOfSplit):
        if isinstance(record, EndOfSplit):
            await bus.js.delete_msg(stream, seq)
