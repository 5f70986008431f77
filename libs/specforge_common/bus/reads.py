"""What both buses derive from their own primitives, written once so they behave the same by
construction: the shared reads, the one way a dead letter is written, waiting for a KV record,
and the ack heartbeat of deliveries held for a long time."""

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
from ..subjects import RunSubjects, StreamKind
from .protocol import BusError, ConsumerLag, Delivery, OnUndecodable, Published, Undecodable

log = get_logger(component="bus")

WAIT_LOG_EVERY_S = 30.0


def given_up_reason(deliveries: int) -> str:
    return (f"delivered {deliveries} times and never settled (the worker crashed, hung or was "
            "killed on it each time); JetStream stopped redelivering it")  # fmt: skip


async def decode_or_report(
    seq: int, subject: str, data: bytes, record_type: Any, undecodable: OnUndecodable | None
) -> Any | None:
    """The record, or None after handing an undecodable message to ``undecodable`` (which,
    when not given, means the ``ContractError`` propagates)."""
    try:
        return decode(data, record_type, subject=subject)
    except ContractError as exc:
        if undecodable is None:
            raise
        await undecodable(Undecodable(seq, subject, bytes(data), exc))
        return None


class BusReads:
    """The part of ``Bus`` built on ``publish``, ``read_log``, ``last_entry``, ``stream_state``
    and ``get_record``, which each implementation provides."""

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
        undecodable: OnUndecodable | None = None,
    ) -> AsyncIterator[tuple[int, SampleRef | EndOfSplit]]:
        """``(stream sequence, record)`` of a split's samples log in order, from ``start_seq``.

        Without ``follow`` it stops at the last message present when called; with ``follow`` it
        keeps waiting for new ones. Nothing is acked or consumed: replay leaves no trace. A
        message that does not decode raises ``ContractError``, or is handed to ``undecodable``
        and skipped (a reader that must not stop on one bad record).
        """
        subjects = RunSubjects(run_id)
        async for item in self.read_log(
            subjects.stream("samples"), subjects.samples(split), SampleRef | EndOfSplit,
            start_seq, follow=follow, idle_timeout=idle_timeout, undecodable=undecodable,
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
