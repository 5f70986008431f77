"""An in-process bus: the ``Bus`` protocol over memory, for single-process (colocated) runs.

The services take a bus object and call its methods; they never see NATS itself. ``LocalBus``
implements the same methods with the same semantics on plain Python data, so one process can
run enqueue, capture, trainer and evaluator together with no broker, sharing every line of
service code with a disaggregated deployment:

- streams per run with stream-wide sequences from 1, subjects routed exactly as in JetStream
  (``sf.<run>.samples.>`` and so on), ``Nats-Msg-Id`` deduplication within the duplicate window;
- records are stored encoded (``contracts.encode``) and decoded on every read, so the wire
  contract is checked as it is on NATS;
- the PROMPTS stream is a work queue (an acked message is gone); durable work consumers hand
  each message to one fetcher, redeliver after ``nak`` (with its delay) or after ``ack_wait``
  without an ack, stop after ``max_deliver`` deliveries;
- ordered replay from any sequence, following new messages when asked;
- the PROMPTLOG stream keeps one message per subject (``max_msgs_per_subject=1``);
- a key-value map for run specs, enqueue summaries and trainer progress, with revisions;
- every read dead-letters and skips an unreadable message (``reads.BusReads.read_record``).

What it does not do: persistence (a LocalBus dies with its process) and several processes.
One event loop owns a LocalBus; services share it by holding the same object. The module is as
long as the ``Bus`` protocol is wide; the stream and consumer model is in ``local_streams``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Generic

from ..contracts import ContractError, PromptTask, Record, RunSpec, decode, encode
from ..subjects import STREAM_KINDS, RunSubjects, StreamKind, kv_subject, matches
from .config import BusConfig
from .local_streams import ConsumerState, Message, Pending, Stream
from .protocol import (
    BusError,
    ConsumerLag,
    Published,
    R,
    RunSpecConflict,
    StreamState,
)
from .reads import BusReads, ConsumerReads, given_up_reason


class LocalDelivery(Generic[R]):
    """One delivered record and the ways to settle it (``protocol.Delivery``)."""

    __slots__ = ("record", "subject", "stream_seq", "deliveries", "_consumer", "_bus", "_data")

    def __init__(
        self, record: R, message: Message, deliveries: int, consumer: LocalWorkConsumer[R]
    ) -> None:
        self.record = record
        self.subject = message.subject
        self.stream_seq = message.seq
        self.deliveries = deliveries
        self._data = message.data
        self._consumer = consumer
        self._bus = consumer.bus

    def _pending(self) -> Pending | None:
        return self._consumer.state.state.get(self.stream_seq)

    async def ack(self) -> None:
        self._consumer.state.settle(self.stream_seq)
        self._bus._notify()

    async def ack_sync(self) -> None:
        await self.ack()

    async def nak(self, delay: float | None = None) -> None:
        pending = self._pending()
        if pending is not None:
            pending.in_flight = False
            pending.ready_at = time.monotonic() + (delay or 0.0)
            self._bus._notify()

    async def in_progress(self) -> None:
        pending = self._pending()
        if pending is not None and pending.in_flight:
            pending.ready_at = time.monotonic() + self._consumer.state.ack_wait_s

    async def term(self) -> None:
        self._consumer.state.settle(self.stream_seq)
        self._bus._notify()

    async def dead_letter(self, reason: str, service: str) -> None:
        await self._bus.dead_letter(
            self._consumer.subjects.run_id, self.subject, self._data, reason, service=service,
            deliveries=self.deliveries, seq=self.stream_seq,
        )  # fmt: skip
        await self.term()


class LocalWorkConsumer(ConsumerReads, Generic[R]):
    """A durable work consumer (``protocol.WorkConsumer``); every binding shares its state."""

    def __init__(
        self,
        bus: LocalBus,
        subjects: RunSubjects,
        kind: StreamKind,
        state: ConsumerState,
        record_type: Any,
        service: str,
    ) -> None:
        self.bus, self.subjects, self.kind, self.state = bus, subjects, kind, state
        self.durable = state.durable
        self.record_type, self.service = record_type, service

    def _take(self, batch: int) -> tuple[list[tuple[Message, int]], float | None]:
        """Up to ``batch`` deliverable messages (marked in flight), and when the next one that
        is waiting (nak delay, ack timeout) becomes deliverable."""
        now = time.monotonic()
        taken: list[tuple[Message, int]] = []
        soonest: float | None = None
        state = self.state
        for message in list(state.stream.messages.values()):
            if len(taken) == batch:
                break
            if not state.wanted(message):
                continue
            pending = state.state.setdefault(message.seq, Pending())
            if pending.deliveries >= state.max_deliver and not pending.in_flight:
                state.give_up(message.seq, pending)  # stays in the stream, never redelivered
                continue
            if pending.in_flight or pending.ready_at > now:
                if pending.in_flight and pending.ready_at <= now:  # ack wait expired
                    pending.in_flight = False
                    if pending.deliveries >= state.max_deliver:
                        state.give_up(message.seq, pending)
                        continue
                else:
                    at = pending.ready_at
                    soonest = at if soonest is None else min(soonest, at)
                    continue
            if pending.deliveries:
                state.redelivered += 1
            pending.deliveries += 1
            pending.in_flight = True
            pending.ready_at = now + state.ack_wait_s
            taken.append((message, pending.deliveries))
        return taken, soonest

    async def fetch(self, batch: int = 100, timeout: float = 1.0) -> list[LocalDelivery[R]]:
        """Up to ``batch`` deliveries; an empty list when nothing arrived within ``timeout``."""
        await asyncio.sleep(0)  # a scheduling point, like the round trip of a NATS fetch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            taken, soonest = self._take(batch)
            if taken:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if soonest is not None:
                remaining = min(remaining, max(soonest - time.monotonic(), 0.001))
            await self.bus._wait_for_change(remaining)
        out: list[LocalDelivery[R]] = []
        for message, deliveries in taken:
            try:
                record = decode(message.data, self.record_type, subject=message.subject)
            except ContractError as exc:  # the bus's one rule: dead-letter, then never again
                if await self.bus.dead_letter_unreadable(
                    message.subject, message.seq, message.data, exc, service=self.service,
                    deliveries=deliveries,
                ):  # fmt: skip
                    self.state.settle(message.seq)
                continue  # not written: redelivered after the ack wait, and tried again
            out.append(LocalDelivery(record, message, deliveries, self))
        return out

    async def close(self) -> None:
        pass


class LocalBus(BusReads):
    """A ``Bus`` without a broker: one process, memory only; see the module doc."""

    def __init__(self, config: BusConfig | None = None) -> None:
        super().__init__()
        self.config = config or BusConfig(name="local")
        self._streams: dict[str, Stream] = {}
        self._consumers: dict[tuple[str, str], ConsumerState] = {}
        self._kv: dict[str, tuple[bytes, int]] = {}  # key -> (value, revision)
        self._kv_revision = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self.closed = False

    @classmethod
    async def connect(cls, config: BusConfig | None = None) -> LocalBus:
        return cls(config)

    async def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> LocalBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self) -> None:
        pass

    # --- change notification ---------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every waiter (publish, nak, ack); each re-checks what it waits for."""
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_for_change(self, timeout: float) -> None:
        """Until the next ``_notify`` or ``timeout``. Callers check their condition first, with
        no await in between, so a change can never slip past unnoticed (one event loop)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    # --- streams ---------------------------------------------------------------------------

    async def ensure_streams(self, run_id: str) -> RunSubjects:
        subjects = RunSubjects(run_id)
        for kind in STREAM_KINDS:
            name = subjects.stream(kind)
            if name not in self._streams:
                self._streams[name] = Stream(name, subjects.stream_subjects(kind),
                                              work_queue=kind == "prompts",
                                              one_per_subject=kind == "promptlog")  # fmt: skip
        return subjects

    async def delete_run_streams(self, run_id: str) -> None:
        subjects = RunSubjects(run_id)
        for kind in STREAM_KINDS:
            name = subjects.stream(kind)
            self._streams.pop(name, None)
            for key in [k for k in self._consumers if k[0] == name]:
                del self._consumers[key]

    def _stream(self, run_id: str, kind: StreamKind) -> Stream:
        name = RunSubjects(run_id).stream(kind)
        try:
            return self._streams[name]
        except KeyError:
            raise BusError(f"stream {name} not found (call ensure_streams first)") from None

    async def stream_state(self, run_id: str, kind: StreamKind) -> StreamState:
        stream = self._stream(run_id, kind)
        first = next(iter(stream.messages), stream.last_seq + 1)
        return StreamState(messages=len(stream.messages), last_seq=stream.last_seq,
                           first_seq=first,
                           bytes=sum(len(m.data) for m in stream.messages.values()))  # fmt: skip

    async def consumers(self, run_id: str, kind: StreamKind) -> list[str]:
        name = self._stream(run_id, kind).name
        return sorted(durable for stream, durable in self._consumers if stream == name)

    # --- publishing ------------------------------------------------------------------------

    def _append(self, subject: str, data: bytes, msg_id: str | None) -> Published:
        for stream in self._streams.values():
            if any(matches(p, subject) for p in stream.subjects):
                break
        else:
            raise BusError(f"no stream takes subject {subject!r} (call ensure_streams first)")
        now = time.monotonic()
        if msg_id:
            seen = stream.msg_ids.get(msg_id)
            if seen is not None and now - seen[1] < self.config.duplicate_window_s:
                return Published(stream.name, seen[0], True)
        stream.last_seq += 1
        stream.messages[stream.last_seq] = Message(stream.last_seq, subject, data)
        older = stream.last_by_subject.get(subject)
        if stream.one_per_subject and older is not None:
            stream.messages.pop(older, None)
        stream.last_by_subject[subject] = stream.last_seq
        if msg_id:
            stream.msg_ids[msg_id] = (stream.last_seq, now)
        return Published(stream.name, stream.last_seq, False)

    async def publish(self, subject: str, record: Record, msg_id: str | None = None) -> Published:
        published = self._append(subject, encode(record), msg_id)
        self._notify()
        return published

    async def publish_many(
        self, items: Iterable[tuple[str, Record, str | None]]
    ) -> list[Published]:
        encoded = [(subject, encode(record), msg_id) for subject, record, msg_id in items]
        published = [self._append(*item) for item in encoded]
        self._notify()
        return published

    # --- consuming -------------------------------------------------------------------------

    async def work_consumer(
        self,
        run_id: str,
        kind: StreamKind,
        durable: str,
        record_type: Any,
        *,
        service: str,
        filter_subject: str | None = None,
        ack_wait_s: float | None = None,
        max_deliver: int | None = None,
    ) -> LocalWorkConsumer[Any]:
        subjects = RunSubjects(run_id)
        stream = self._stream(run_id, kind)
        key = (stream.name, durable)
        if key not in self._consumers:  # like JetStream: the first binding sets the config
            self._consumers[key] = ConsumerState(
                stream, durable, filter_subject or subjects.stream_subjects(kind)[0],
                ack_wait_s or self.config.ack_wait_s, max_deliver or self.config.max_deliver,
            )  # fmt: skip
        return LocalWorkConsumer(self, subjects, kind, self._consumers[key], record_type, service)

    async def given_up(
        self, run_id: str, kind: StreamKind, durable: str
    ) -> AsyncIterator[tuple[int, int]]:
        stream = self._stream(run_id, kind)
        state = self._consumers.get((stream.name, durable))
        if state is None:
            raise BusError(f"consumer {durable} not found on {stream.name}")
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        state.advisories.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            state.advisories.remove(queue)

    async def stored_sequences(self, run_id: str, kind: StreamKind, subject: str) -> list[int]:
        stream = self._stream(run_id, kind)
        return [m.seq for m in stream.messages.values() if matches(subject, m.subject)]

    async def dead_letter_given_up(
        self, run_id: str, kind: StreamKind, seq: int, deliveries: int, *, service: str
    ) -> bool:
        stream = self._stream(run_id, kind)
        message = stream.messages.pop(seq, None)
        if message is None:
            return False
        reason = given_up_reason(deliveries)
        await self.dead_letter(run_id, message.subject, message.data, reason,
                               service=service, deliveries=deliveries, seq=seq)  # fmt: skip
        return True

    async def consumer_lag(self, run_id: str, kind: StreamKind, durable: str) -> ConsumerLag:
        stream = self._stream(run_id, kind)
        try:
            state = self._consumers[(stream.name, durable)]
        except KeyError:
            raise BusError(f"consumer {durable} not found on {stream.name}") from None
        # As JetStream counts: delivered and unsettled is ack-pending, in flight or waiting out
        # a nak delay; a message given up after max_deliver is neither pending nor ack-pending.
        pending = ack_pending = 0
        for message in stream.messages.values():
            if not state.wanted(message):
                continue
            delivery = state.state.get(message.seq)
            if delivery is None or not delivery.deliveries:
                pending += 1
            elif not (delivery.given_up or (delivery.deliveries >= state.max_deliver
                                            and not delivery.in_flight)):  # fmt: skip
                ack_pending += 1
        return ConsumerLag(
            num_pending=pending, num_ack_pending=ack_pending,
            num_redelivered=state.redelivered, ack_floor=state.ack_floor,
            ack_wait_s=state.ack_wait_s, max_deliver=state.max_deliver,
        )  # fmt: skip

    async def read_log(
        self,
        stream: str,
        subject: str,
        record_type: Any,
        start_seq: int = 1,
        *,
        follow: bool = False,
        idle_timeout: float = 5.0,
    ) -> AsyncIterator[tuple[int, Any]]:
        try:
            log_stream = self._streams[stream]
        except KeyError:
            if follow:
                raise BusError(f"stream {stream} not found") from None
            return
        end = None if follow else log_stream.last_seq
        seq = max(start_seq, 1)
        while end is None or seq <= end:
            if seq > log_stream.last_seq:
                await self._wait_for_change(idle_timeout)
                continue
            message = log_stream.messages.get(seq)
            seq += 1
            if message is not None and matches(subject, message.subject):
                record = await self.read_record(
                    message.subject, message.seq, message.data, record_type
                )
                if record is not None:
                    yield message.seq, record

    async def prompt_task(self, run_id: str, prompt_id: str) -> PromptTask | None:
        subjects = RunSubjects(run_id)
        stream = self._streams.get(subjects.stream("promptlog"))
        subject = subjects.prompt_log(prompt_id)
        seq = stream.last_by_subject.get(subject) if stream is not None else None
        if stream is None or seq is None or seq not in stream.messages:
            return None
        return await self.read_record(subject, seq, stream.messages[seq].data, PromptTask)

    async def last_entry(
        self, run_id: str, kind: StreamKind, record_type: Any
    ) -> tuple[int, Any] | None:
        subjects = RunSubjects(run_id)
        stream = self._streams.get(subjects.stream(kind))
        subject = subjects.stream_subjects(kind)[0]
        for message in reversed(list(stream.messages.values()) if stream is not None else []):
            if not matches(subject, message.subject):
                continue
            record = await self.read_record(message.subject, message.seq, message.data,
                                            record_type)  # fmt: skip
            if record is not None:
                return message.seq, record
        return None

    # --- key-value -------------------------------------------------------------------------

    def put_raw(self, key: str, value: bytes) -> int:
        """Store ``value`` under ``key`` as the next revision (what a KV put does)."""
        self._kv_revision += 1
        self._kv[key] = (value, self._kv_revision)
        return self._kv_revision

    async def put_record(self, key: str, record: Record, *, create_only: bool = False) -> bool:
        if create_only and key in self._kv:
            return False
        self.put_raw(key, encode(record))
        return True

    async def get_record(self, key: str, record_type: Any) -> Any | None:
        if key not in self._kv:
            return None
        value, revision = self._kv[key]
        return await self.read_record(kv_subject(key), revision, value, record_type)

    async def records_by_prefix(self, prefix: str, record_type: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key in sorted(k for k in self._kv if fnmatch.fnmatchcase(k, f"{prefix}*")):
            record = await self.get_record(key, record_type)
            if record is not None:
                found[key] = record
        return found

    async def put_run_spec(self, spec: RunSpec, *, replace: bool = False) -> RunSpec:
        if spec.run_id not in self._kv or replace:
            self.put_raw(spec.run_id, encode(spec))
            return spec
        existing = await self.get_run_spec(spec.run_id)
        if existing is not None and existing.spec_hash() == spec.spec_hash():
            return existing
        raise RunSpecConflict(
            f"run {spec.run_id!r} already has a different spec (hash "
            f"{existing.spec_hash() if existing else 'unreadable, dead-lettered'} vs "
            f"{spec.spec_hash()}); choose a new run id or replace it explicitly"
        )
