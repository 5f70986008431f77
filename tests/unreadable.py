"""Messages no reader can use, written past the contracts as a broken or foreign producer would:
random bytes, a valid record of another kind, and the expected record at a newer major schema
version. Shared by the bus tests and the service tests of the one rule (dead-letter and read on).
"""

from __future__ import annotations

import random

import msgspec

from specforge_common.bus import Bus, LocalBus
from specforge_common.contracts import (
    SCHEMA_VERSION,
    DeadLetter,
    EnqueueSummary,
    Record,
    TrainerProgress,
    encode,
)

GARBAGE = ("random bytes", "another kind", "newer major version")


def garbage(kind: str, like: Record) -> bytes:
    """Unreadable bytes of ``kind`` for a reader of ``like``'s type."""
    if kind == "random bytes":
        return b"\xc1" + random.Random(len(kind)).randbytes(40)  # 0xc1: never valid msgpack
    if kind == "another kind":
        other: Record = EnqueueSummary(run_id="r", sources=[], train=0, eval=0, skipped=0,
                                       run_spec_hash="h")  # fmt: skip
        if isinstance(like, EnqueueSummary):
            other = TrainerProgress(run_id="r", rank=0, step=0, samples_consumed=0,
                                    last_sequence=0, run_spec_hash="h")  # fmt: skip
        return encode(other)
    assert kind == "newer major version", kind
    return encode(msgspec.structs.replace(like, schema_version=SCHEMA_VERSION + 1))


async def publish_raw(bus: Bus, subject: str, data: bytes) -> int:
    """Publish bytes that bypass the contracts; their stream sequence."""
    if isinstance(bus, LocalBus):
        published = bus._append(subject, data, None)
        bus._notify()
        return published.seq
    return int((await bus.js.publish(subject, data)).seq)  # type: ignore[attr-defined]


async def put_raw(bus: Bus, key: str, data: bytes) -> int:
    """Put bytes that bypass the contracts under a KV key; their revision."""
    if isinstance(bus, LocalBus):
        return bus.put_raw(key, data)
    kv = await bus._runs_kv()  # type: ignore[attr-defined]
    return int(await kv.put(key, data))


async def dead_letters(bus: Bus, run_id: str) -> dict[tuple[str, int | None], DeadLetter]:
    """The run's dead letters by (subject, stream sequence)."""
    found = {}
    async for _, letter in bus.records(run_id, "dlq", DeadLetter):
        found[(letter.subject, letter.stream_sequence)] = letter
    return found


def assert_dead_lettered(
    letters: dict[tuple[str, int | None], DeadLetter], rows: list[tuple[str, int, bytes]]
) -> None:
    """Each ``(subject, seq, payload)`` has its letter, with the payload and a reason."""
    for subject, seq, payload in rows:
        letter = letters.get((subject, seq))
        assert letter is not None, (subject, seq, sorted(letters, key=str))
        assert letter.payload == payload, (subject, seq)
        assert letter.reason.startswith("unreadable record: "), letter.reason
