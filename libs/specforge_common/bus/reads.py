"""What both buses derive from their own primitives, written once so they behave the same by
construction: the one way a record is read (decoded, or dead-lettered and skipped), the one way
a dead letter is written, the shared reads, waiting for a KV record, and the ack heartbeat of
deliveries held for a long time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any

from ..aio import in_background
from ..contracts import (
    ContractError,
    DeadLetter,
    EndOfSplit,
    RunSpec,
    SampleRef,
    Split,
    decode,
)
from ..log import get_logger
from ..subjects import RunSubjects, StreamKind, run_of_subject
from .protocol import BusError, ConsumerLag, Delivery, Published

log = get_logger(component="bus")

WAIT_LOG_EVERY_S = 30.0


def given_up_reason(deliveries: int) -> str:
    return (f"delivered {deliveries} times and never settled (the worker crashed, hung or was "
            "killed on it each time); JetStream stopped redelivering it")  # fmt: skip


class BusReads:
    """The part of ``Bus`` built on ``publish``, ``read_log``, ``last_entry``, ``stream_state``
    and ``get_record``, which each implementation provides.

    Every read of every implementation decodes through ``read_record``: a message that is no
    valid record of the expected type (garbage, another kind, another major schema version) is
    dead-lettered with its subject, sequence and reason and skipped, so one bad message can
    neither stop a reader nor be forgotten by one.
    """

    config: Any
    _letters_sent: set[tuple[str, int | None]]

    def __init__(self) -> None:
        self._letters_sent = set()  # (subject, seq) dead-lettered by this process

    async def read_record(
        self, subject: str, seq: int | None, data: bytes, record_type: Any
    ) -> Any | None:
        """The record in ``data`` (stored at ``subject``, ``seq``: a stream sequence or a KV
        revision), or None once it is dead-lettered as unreadable."""
        try:
            return decode(data, record_type, subject=subject)
        except ContractError as exc:
            await self.dead_letter_unreadable(subject, seq, data, exc)
            return None

    async def dead_letter_unreadable(
        self, subject: str, seq: int | None, data: bytes, error: ContractError, *,
        service: str | None = None, deliveries: int = 0,
    ) -> bool:  # fmt: skip
        """Dead-letter a message that does not decode (``service``: who read it, by default
        this connection's name), once per process (readers re-read logs; the message id dedups
        across processes). Never raises: a reader must read on even when the letter cannot be
        written (no DLQ stream); False then, and the next read retries."""
        key = (subject, seq)
        if key in self._letters_sent:
            return True
        run_id = run_of_subject(subject)
        reason = f"unreadable record: {error}"
        log.error("unreadable record dead-lettered and skipped", subject=subject, seq=seq,
                  reason=reason)  # fmt: skip
        if run_id is None:
            return False
        try:
            await self.dead_letter(run_id, subject, data, reason,
                                   service=service or self.config.name, deliveries=deliveries,
                                   seq=seq)  # fmt: skip
        except Exception as exc:  # no DLQ stream, broker gone: the read itself goes on
            log.error("cannot dead-letter an unreadable record", subject=subject, seq=seq,
                      error=repr(exc))  # fmt: skip
            return False
        self._letters_sent.add(key)
        return True

    async def stream_depth(self, run_id: str, kind: StreamKind) -> int:
        return (await self.stream_state(run_id, kind)).messages

    async def dead_letter(
        self, run_id: str, subject: str, payload: bytes, reason: str, *, service: str,
        deliveries: int = 0, seq: int | None = None,
    ) -> Published:  # fmt: skip
        """Record on the run's dead-letter subject why a message can never be used. One letter
        per stored message: the id is its subject and sequence."""
        letter = DeadLetter(subject=subject, reason=reason, payload=bytes(payload),
                            service=service, run_id=run_id, deliveries=deliveries,
                            stream_sequence=seq)  # fmt: skip
        msg_id = f"dlq:{subject}:{seq}" if seq is not None else None
        return await self.publish(RunSubjects(run_id).dlq, letter, msg_id)

    async def replay(
        self,
        run_id: str,
        split: Split,
        start_seq: int = 1,
        *,
        follow: bool = False,
        idle_timeout: float = 5.0,
    ) -> AsyncIterator[tuple[int, SampleRef | EndOfSplit]]:
        """``(stream sequence, record)`` of a split's samples log in order, from ``start_seq``.

        Without ``follow`` it stops at the last message present when called; with ``follow`` it
        keeps waiting for new ones. Nothing is acked or consumed: replay leaves no trace (but
        for the dead letter of a message that does not decode, which is skipped).
        """
        subjects = RunSubjects(run_id)
        async for item in self.read_log(
            subjects.stream("samples"), subjects.samples(split), SampleRef | EndOfSplit,
            start_seq, follow=follow, idle_timeout=idle_timeout,
        ):  # fmt: skip
            yield item

    async def records(
        self, run_id: str, kind: StreamKind, record_type: Any
    ) -> AsyncIterator[tuple[int, Any]]:
        """Every record of a run stream (checkpoints, evals, dlq) in order, as of now."""
        subjects = RunSubjects(run_id)
        stream = subjects.stream(kind)
        async for item in self.read_log(stream, subjects.stream_subjects(kind)[0], record_type):
            yield item

    async def last_record(self, run_id: str, kind: StreamKind, record_type: Any) -> Any | None:
        """The newest record of a run stream, or None (for status displays)."""
        last = await self.last_entry(run_id, kind, record_type)
        return None if last is None else last[1]

    async def get_run_spec(self, run_id: str) -> RunSpec | None:
        return await self.get_record(run_id, RunSpec)

    async def wait_for_record(
        self,
        key: str,
        record_type: Any,
        *,
        timeout: float | None = None,
        what: str = "",
        stop: asyncio.Event | None = None,
        poll: float = 0.25,
    ) -> Any | None:
        """The record at ``key``, waiting while nobody has written it (services start in any
        order) with a log line now and then. None when ``stop`` is set first; ``BusError``
        once ``timeout`` seconds have passed."""
        what = what or f"record {key!r}"
        loop = asyncio.get_running_loop()
        start = logged = loop.time()
        while (record := await self.get_record(key, record_type)) is None:
            now = loop.time()
            if stop is not None and stop.is_set():
                return None
            if timeout is not None and now - start >= timeout:
                raise BusError(f"no {what} after {timeout:g}s (KV key {key!r})")
            if now == start or now - logged >= WAIT_LOG_EVERY_S:
                log.info(f"waiting for the {what}", key=key, waited_s=round(now - start, 1))
                logged = now
            wait = poll if timeout is None else max(min(poll, start + timeout - now), 0.01)
            if stop is None:
                await asyncio.sleep(wait)
            else:
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        return record


class ConsumerReads:
    """``messages`` and ``lag`` of both buses' work consumers, from their ``fetch``."""

    async def messages(
        self, batch: int = 100, timeout: float = 1.0, *, stop_when_idle: bool = False
    ) -> AsyncIterator[Any]:
        """Deliveries forever (or until one fetch comes back empty with ``stop_when_idle``)."""
        while True:
            deliveries = await self.fetch(batch, timeout)
            if not deliveries and stop_when_idle:
                return
            for delivery in deliveries:
                yield delivery

    async def lag(self) -> ConsumerLag:
        return await self.bus.consumer_lag(self.subjects.run_id, self.kind, self.durable)


def heartbeat_interval(ack_wait_s: float) -> float:
    """Three heartbeats per ack wait: one may be late or lost without a redelivery."""
    return max(ack_wait_s / 3.0, 0.05)


@asynccontextmanager
async def heartbeat(
    held: Callable[[], Iterable[Delivery[Any]]], ack_wait_s: float
) -> AsyncIterator[None]:
    """While the block runs, tell the server every ``ack_wait_s / 3`` that each delivery
    ``held()`` returns is still being worked on, so slow work is not redelivered meanwhile."""
    interval = heartbeat_interval(ack_wait_s)

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            for delivery in list(held()):
                try:
                    await delivery.in_progress()
                except Exception as exc:  # a lost heartbeat only risks a redelivery
                    log.debug("in-progress ack failed", error=repr(exc))

    async with in_background(beat()):
        yield
