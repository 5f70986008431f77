"""The bus over NATS JetStream: the only module that touches nats-py.

One connection per process. Producers publish with ``Nats-Msg-Id`` so a retried publish is a
no-op; consumers pull with explicit acks so a crash means redelivery, never loss. Messages that
can never be decoded are dead-lettered with the reason and terminated, not retried forever.
The module is as long as the ``Bus`` protocol is wide: one class, one method per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js import api

from ..contracts import PromptTask, Record, RunSpec, encode
from ..log import get_logger
from ..subjects import RUNS_BUCKET, STREAM_KINDS, RunSubjects, StreamKind, kv_subject, matches
from .config import BusConfig
from .jetstream_consumer import JetStreamWorkConsumer, stream_sequence
from .protocol import (
    BusError,
    BusPermissionError,
    ConsumerLag,
    Published,
    RunSpecConflict,
    StreamState,
)
from .reads import BusReads, given_up_reason

log = get_logger(component="bus")

STREAM_EXISTS_DIFFERENT = 10058  # JetStream err_code: stream name in use with another config
# How the server names a refused subject in its -ERR line.
_REFUSED = re.compile(r"permissions violation for (?:publish|subscription) to \"?([^\"'\s]+)", re.I)
T = TypeVar("T")


class JetStreamBus(BusReads):
    """A JetStream connection (``protocol.Bus``)."""

    def __init__(self, nc: nats.NATS, config: BusConfig) -> None:
        super().__init__()
        self.nc = nc
        self.js = nc.jetstream(timeout=config.request_timeout_s)
        self.config = config
        self._kv: Any = None
        self._state = _ConnectionState()

    @classmethod
    async def connect(cls, config: BusConfig | None = None) -> JetStreamBus:
        config = config or BusConfig()
        state = _ConnectionState()
        kwargs: dict[str, Any] = {
            "servers": list(config.servers),
            "name": config.name,
            "connect_timeout": config.connect_timeout_s,
            "max_reconnect_attempts": max(config.connect_attempts, 1),
            "reconnect_time_wait": 1,
            "error_cb": functools.partial(_on_error, state),
            "disconnected_cb": functools.partial(_log_disconnect, state),
            "reconnected_cb": _log_reconnect,
        }
        if config.user is not None:
            kwargs["user"], kwargs["password"] = config.user, config.password
        if config.token is not None:
            kwargs["token"] = config.token
        if config.creds_file is not None:
            kwargs["user_credentials"] = config.creds_file
        tls = config.tls_context()
        if tls is not None:
            kwargs["tls"] = tls
            if config.tls_hostname:
                kwargs["tls_hostname"] = config.tls_hostname
        # nats-py retries a failed TLS handshake (an untrusted server certificate) without
        # counting attempts, so the first connection gets a deadline of its own.
        attempts = max(config.connect_attempts, 1) * len(config.servers)
        deadline = attempts * (config.connect_timeout_s + 1.0) + 1.0
        try:
            nc = await asyncio.wait_for(nats.connect(**kwargs), deadline)
        except asyncio.TimeoutError:  # an OSError too: caught first
            raise BusError(f"cannot connect to NATS at {config.servers} within {deadline:g}s "
                           f"(last error: {state.last_error!r})") from None  # fmt: skip
        except (OSError, nats.errors.Error) as exc:
            raise BusError(f"cannot connect to NATS at {config.servers}: {exc!r}") from exc
        # nats-py applies one attempt limit to the first connect and to reconnects; once
        # connected, a service should ride out a broker restart instead of giving up.
        nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
        bus = cls(nc, config)
        bus._state = state
        return bus

    @property
    def refused_subjects(self) -> list[str]:
        """Subjects the server refused this connection (lower-cased), oldest first: a service
        whose role lacks a permission shows it here and in its log."""
        return list(self._state.refusals)

    async def close(self) -> None:
        self._state.closing = True
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> JetStreamBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- streams ---------------------------------------------------------------------------

    def _stream_config(self, subjects: RunSubjects, kind: StreamKind) -> api.StreamConfig:
        return api.StreamConfig(
            name=subjects.stream(kind),
            subjects=subjects.stream_subjects(kind),
            retention=(
                api.RetentionPolicy.WORK_QUEUE if kind == "prompts" else api.RetentionPolicy.LIMITS
            ),
            # The prompt log keeps only the newest task of each prompt id (one subject each).
            max_msgs_per_subject=1 if kind == "promptlog" else -1,
            storage=api.StorageType(self.config.storage),
            num_replicas=self.config.replicas,
            duplicate_window=self.config.duplicate_window_s,
            description=f"specforge run {subjects.run_id}: {kind}",
        )

    async def ensure_streams(self, run_id: str) -> RunSubjects:
        """Create (or bring up to date) the run's streams and the run-spec bucket.

        A stream that already has the wanted subjects and limits is left alone, so a role that
        may not create or update streams (see deploy/nats-server.conf) can call this once the
        enqueue or operator role made them; it gets ``BusPermissionError`` when one is missing.
        """
        subjects = RunSubjects(run_id)
        for kind in STREAM_KINDS:
            config = self._stream_config(subjects, kind)
            try:
                current = (await self.js.stream_info(config.name)).config
            except nats.js.errors.NotFoundError:
                current = None
            if current is not None and _same_stream(current, config):
                continue
            create = f"$JS.API.STREAM.CREATE.{config.name}"
            try:
                await self._unless_refused(f"create stream {config.name}", [create],
                                           self.js.add_stream(config))  # fmt: skip
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_EXISTS_DIFFERENT:
                    raise
                update = f"$JS.API.STREAM.UPDATE.{config.name}"
                await self._unless_refused(f"update stream {config.name}", [update],
                                           self.js.update_stream(config))  # fmt: skip
        await self._runs_kv()
        return subjects

    async def _unless_refused(self, what: str, subjects: list[str], call: Awaitable[T]) -> T:
        """Await ``call``, but raise ``BusPermissionError`` as soon as the server refuses this
        user one of ``subjects`` (it answers a refused request with an -ERR line, not a reply,
        so the request alone would only time out)."""
        refused = self._state.watch(subjects)
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait({task, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._state.unwatch(refused)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise BusPermissionError(
            f"NATS refused user {self.config.user!r} permission to {what} ({refused.result()!r} "
            "is not among its role's subjects; see deploy/nats-server.conf)"
        )

    async def delete_run_streams(self, run_id: str) -> None:
        subjects = RunSubjects(run_id)
        for kind in STREAM_KINDS:
            name = subjects.stream(kind)
            try:
                await self._unless_refused(f"delete stream {name}",
                                           [f"$JS.API.STREAM.DELETE.{name}"],
                                           self.js.delete_stream(name))  # fmt: skip
            except nats.js.errors.NotFoundError:
                pass

    async def stream_state(self, run_id: str, kind: StreamKind) -> StreamState:
        stream = RunSubjects(run_id).stream(kind)
        with _as_bus_error(f"stream {stream}"):
            state = (await self.js.stream_info(stream)).state
        return StreamState(messages=int(state.messages), last_seq=int(state.last_seq or 0),
                           first_seq=int(state.first_seq or 0),
                           bytes=int(state.bytes or 0))  # fmt: skip

    async def flush(self) -> None:
        """Wait until everything sent (acks are fire-and-forget) reached the server."""
        await self.nc.flush()

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, subject: str, record: Record, msg_id: str | None = None) -> Published:
        """Publish and wait for the PubAck; with ``msg_id`` a repeat in the window is a no-op."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        ack = await self._unless_refused(f"publish to {subject}", [subject],
                                         self.js.publish(subject, encode(record),
                                                         headers=headers))  # fmt: skip
        return Published(ack.stream, ack.seq, bool(ack.duplicate))

    async def publish_many(
        self, items: Iterable[tuple[str, Record, str | None]]
    ) -> list[Published]:
        """Pipelined publish of ``(subject, record, msg_id)`` items; returns once all are acked."""
        futures, subjects = [], set()
        for subject, record, msg_id in items:
            headers = {"Nats-Msg-Id": msg_id} if msg_id else None
            subjects.add(subject)
            futures.append(await self.js.publish_async(subject, encode(record), headers=headers))
        acks = await self._unless_refused(f"publish to {sorted(subjects)}", sorted(subjects),
                                          asyncio.gather(*futures))  # fmt: skip
        for ack in acks:
            if not isinstance(ack, api.PubAck):
                raise BusError(f"publish was not acknowledged: {ack!r}")
        return [Published(a.stream, a.seq, bool(a.duplicate)) for a in acks]

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
    ) -> JetStreamWorkConsumer[Any]:
        """Bind to (creating if needed) the durable pull consumer ``durable`` on a run stream."""
        subjects = RunSubjects(run_id)
        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s or self.config.ack_wait_s,
            max_deliver=max_deliver or self.config.max_deliver,
            max_ack_pending=self.config.max_ack_pending,
            filter_subject=filter_subject,
        )
        sub = await self.js.pull_subscribe(
            filter_subject or subjects.stream_subjects(kind)[0],
            durable=durable,
            stream=subjects.stream(kind),
            config=config,
        )
        return JetStreamWorkConsumer(self, subjects, kind, durable, record_type, sub, service)

    async def given_up(
        self, run_id: str, kind: StreamKind, durable: str
    ) -> AsyncIterator[tuple[int, int]]:
        """``(stream sequence, deliveries)`` of each message the consumer ``durable`` stopped
        redelivering after ``max_deliver`` attempts (JetStream's max-deliveries advisory).

        Such a message was never settled — its worker crashed or hung on it every time — so
        nobody dead-lettered it; it stays in the stream. See ``dead_letter_given_up``.
        """
        stream = RunSubjects(run_id).stream(kind)
        sub = await self.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"
        )
        try:
            async for msg in sub.messages:
                try:
                    advisory = msgspec.json.decode(msg.data)
                    yield int(advisory["stream_seq"]), int(advisory.get("deliveries", 0))
                except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                    log.warning("unreadable max-deliveries advisory", error=repr(exc))
        finally:
            with contextlib.suppress(nats.errors.ConnectionClosedError,
                                     nats.errors.BadSubscriptionError):  # fmt: skip
                await sub.unsubscribe()

    async def stored_sequences(self, run_id: str, kind: StreamKind, subject: str) -> list[int]:
        """Sequences of the messages of ``subject`` stored now (a stored-message walk, which a
        work-queue stream allows where a second consumer would be refused)."""
        stream, seqs, seq = RunSubjects(run_id).stream(kind), [], 1
        while True:
            try:
                msg = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return seqs
            seqs.append(int(msg.seq or seq))
            seq = seqs[-1] + 1

    async def dead_letter_given_up(
        self, run_id: str, kind: StreamKind, seq: int, deliveries: int, *, service: str
    ) -> bool:
        """Dead-letter a message ``given_up`` reported and delete it from its stream (a work
        queue would otherwise keep it forever). False when it is already gone (another worker
        handled the same advisory)."""
        subjects = RunSubjects(run_id)
        stream = subjects.stream(kind)
        try:
            msg = await self.js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return False
        await self.dead_letter(run_id, msg.subject, msg.data or b"", given_up_reason(deliveries),
                               service=service, deliveries=deliveries, seq=seq)  # fmt: skip
        try:
            await self.js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            pass
        return True

    async def consumer_lag(self, run_id: str, kind: StreamKind, durable: str) -> ConsumerLag:
        stream = RunSubjects(run_id).stream(kind)
        with _as_bus_error(f"consumer {durable} of {stream}"):
            info = await self.js.consumer_info(stream, durable)
        return ConsumerLag(
            num_pending=info.num_pending or 0,
            num_ack_pending=info.num_ack_pending or 0,
            num_redelivered=info.num_redelivered or 0,
            ack_floor=(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
            ack_wait_s=float(info.config.ack_wait or 0.0),
            max_deliver=int(info.config.max_deliver or 0),
        )

    async def consumers(self, run_id: str, kind: StreamKind) -> list[str]:
        stream = RunSubjects(run_id).stream(kind)
        with _as_bus_error(f"consumers of {stream}"):
            infos = await self.js.consumers_info(stream)
        return sorted(info.name for info in infos if info.config.durable_name)

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
        """Ordered read of ``subject`` in ``stream`` from ``start_seq`` (an ordered consumer)."""
        last = None
        if not follow:
            try:
                last = (await self.js.get_msg(stream, subject=subject)).seq
            except nats.js.errors.NotFoundError:
                return
            if last is None or last < start_seq:
                return
        sub = await self.js.subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=max(start_seq, 1)),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout)
                except nats.errors.TimeoutError:
                    if follow:
                        continue
                    raise BusError(f"reading {subject} stalled before sequence {last}") from None
                seq = stream_sequence(msg)
                record = await self.read_record(msg.subject, seq, msg.data, record_type)
                if record is not None:
                    yield seq, record
                if last is not None and seq >= last:
                    return
        finally:
            await sub.unsubscribe()

    async def prompt_task(self, run_id: str, prompt_id: str) -> PromptTask | None:
        """The last PromptTask enqueued for ``prompt_id`` (from the prompt log), or None."""
        subjects = RunSubjects(run_id)
        subject = subjects.prompt_log(prompt_id)
        try:
            msg = await self.js.get_msg(subjects.stream("promptlog"), subject=subject)
        except nats.js.errors.NotFoundError:  # no such message, or no prompt log at all
            return None
        return await self.read_record(subject, msg.seq, msg.data or b"", PromptTask)

    async def last_entry(
        self, run_id: str, kind: StreamKind, record_type: Any
    ) -> tuple[int, Any] | None:
        """``(stream sequence, record)`` of the newest readable message of a run stream, or
        None. Unreadable newer ones are dead-lettered and the walk goes back past them."""
        subjects = RunSubjects(run_id)
        stream, subject = subjects.stream(kind), subjects.stream_subjects(kind)[0]
        try:
            msg = await self.js.get_msg(stream, subject=subject)
        except nats.js.errors.NotFoundError:
            return None
        while True:
            seq = int(msg.seq or 0)
            record = await self.read_record(msg.subject, seq, msg.data or b"", record_type)
            if record is not None:
                return seq, record
            msg = await self._previous(stream, subject, seq)
            if msg is None:
                return None

    async def _previous(self, stream: str, subject: str, seq: int) -> Any | None:
        """The newest message of ``subject`` before ``seq`` (JetStream only looks forward by
        subject, so this steps back one sequence at a time: rare, after a bad message)."""
        first = int((await self.js.stream_info(stream)).state.first_seq or 1)
        for before in range(seq - 1, first - 1, -1):
            try:
                msg = await self.js.get_msg(stream, before)
            except nats.js.errors.NotFoundError:  # deleted
                continue
            if matches(subject, msg.subject or ""):
                return msg
        return None

    # --- run specs -------------------------------------------------------------------------

    async def _runs_kv(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(RUNS_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self.js.create_key_value(
                    bucket=RUNS_BUCKET,
                    history=8,
                    storage=api.StorageType(self.config.storage),
                    replicas=self.config.replicas,
                    description="specforge run specs: run id -> RunSpec",
                )
        return self._kv

    async def put_record(self, key: str, record: Record, *, create_only: bool = False) -> bool:
        """Store a record under ``key`` in the runs bucket; with ``create_only`` keep an
        existing value and return False."""
        kv = await self._runs_kv()
        subject = [kv_subject(key)]
        if not create_only:
            await self._unless_refused(f"write {key!r}", subject, kv.put(key, encode(record)))
            return True
        try:
            await self._unless_refused(f"write {key!r}", subject, kv.create(key, encode(record)))
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False

    async def get_record(self, key: str, record_type: Any) -> Any | None:
        kv = await self._runs_kv()
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return await self.read_record(kv_subject(key), entry.revision, entry.value, record_type)

    async def records_by_prefix(self, prefix: str, record_type: Any) -> dict[str, Any]:
        """Every live record whose KV key starts with ``prefix`` (a dotted prefix such as
        ``<run>.progress.``).

        The keys come from the KV stream's per-subject state (a server-side subject filter, one
        request), then each key is read. ``KeyValue.keys()`` is not used: it scans the whole
        bucket through a watcher whose end-of-initial-values marker can arrive before the
        values (a nats-py race seen in testing), which loses keys.
        """
        kv = await self._runs_kv()
        kv_prefix = f"$KV.{RUNS_BUCKET}."
        info = await self.js.stream_info(
            f"KV_{RUNS_BUCKET}", subjects_filter=f"{kv_prefix}{prefix}>"
        )
        found: dict[str, Any] = {}
        for subject in sorted(info.state.subjects or {}):
            key = subject[len(kv_prefix) :]
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue
            if not entry.value:
                continue
            record = await self.read_record(subject, entry.revision, entry.value, record_type)
            if record is not None:
                found[key] = record
        return found

    async def put_run_spec(self, spec: RunSpec, *, replace: bool = False) -> RunSpec:
        """Store the run's spec. An identical spec is fine; a different one needs ``replace``."""
        kv = await self._runs_kv()
        data = encode(spec)
        subject = [kv_subject(spec.run_id)]
        try:
            await self._unless_refused(f"store the spec of {spec.run_id!r}", subject,
                                       kv.create(spec.run_id, data))  # fmt: skip
            return spec
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        existing = await self.get_run_spec(spec.run_id)
        if existing is not None and existing.spec_hash() == spec.spec_hash():
            return existing
        if not replace:
            raise RunSpecConflict(
                f"run {spec.run_id!r} already has a different spec (hash "
                f"{existing.spec_hash() if existing else 'unreadable, dead-lettered'} vs "
                f"{spec.spec_hash()}); "
                "choose a new run id or replace it explicitly"
            )
        await self._unless_refused(f"store the spec of {spec.run_id!r}", subject,
                                   kv.put(spec.run_id, data))  # fmt: skip
        return spec


@contextlib.contextmanager
def _as_bus_error(what: str) -> Iterator[None]:
    """A server-side failure of a read the caller can live without, as ``BusError``."""
    try:
        yield
    except nats.js.errors.NotFoundError:
        raise BusError(f"{what} not found") from None
    except (nats.errors.Error, asyncio.TimeoutError) as exc:
        raise BusError(f"cannot read {what}: {exc!r}") from exc


async def _on_error(state: _ConnectionState, exc: Exception) -> None:
    log.warning("nats error", error=repr(exc))
    state.last_error = exc
    refused = _REFUSED.search(str(exc))
    if refused:
        state.refused(refused.group(1))


def _same_stream(current: api.StreamConfig, wanted: api.StreamConfig) -> bool:
    """Whether an existing stream already is what ``ensure_streams`` would make of it (the
    settings an update could change; storage and retention cannot change)."""
    return (
        sorted(current.subjects or []) == sorted(wanted.subjects or [])
        and (current.max_msgs_per_subject or -1) == (wanted.max_msgs_per_subject or -1)
        and float(current.duplicate_window or 0) == float(wanted.duplicate_window or 0)
    )


@dataclass
class _ConnectionState:
    closing: bool = False
    last_error: Exception | None = None
    refusals: list[str] = field(default_factory=list)  # subjects the server refused, in order
    # Futures waiting on a permission refusal of any of their subjects (``_unless_refused``).
    watchers: dict[asyncio.Future[str], frozenset[str]] = field(default_factory=dict)

    def watch(self, subjects: Iterable[str]) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.watchers[future] = frozenset(s.lower() for s in subjects)
        return future

    def unwatch(self, future: asyncio.Future[str]) -> None:
        self.watchers.pop(future, None)

    def refused(self, subject: str) -> None:
        """nats-py reports the refused subject lower-cased, so subjects compare that way."""
        self.refusals.append(subject)
        for future, subjects in self.watchers.items():
            if subject.lower() in subjects and not future.done():
                future.set_result(subject)


async def _log_disconnect(state: _ConnectionState) -> None:
    if not state.closing:
        log.warning("nats disconnected")


async def _log_reconnect() -> None:
    log.info("nats reconnected")
