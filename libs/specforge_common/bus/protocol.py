"""What a bus is to the services: the ``Bus``, ``WorkConsumer`` and ``Delivery`` protocols and
the plain values they return.

Two implementations: ``jetstream.JetStreamBus`` (NATS JetStream, every deployment) and
``local.LocalBus`` (one process, memory only, for ``specforge run --colocated`` and tests).
Services are written against these protocols only, so neither nats-py nor its types reach them;
``docs/architecture.md`` describes the streams and subjects behind the methods.

Every read path (work consumers, log reads, last records, the prompt log, KV records) applies one
rule itself: a message that is no valid record of the type asked for is dead-lettered on the
run's DLQ with its subject, stream sequence and reason, and skipped. No read raises
``ContractError``, so no caller can stop on a bad message or forget to report it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..contracts import EndOfSplit, PromptTask, Record, RunSpec, SampleRef, Split
from ..subjects import RunSubjects, StreamKind
from .config import BusConfig

R = TypeVar("R", bound=Record)
R_co = TypeVar("R_co", bound=Record, covariant=True)


class BusError(RuntimeError):
    pass


class BusPermissionError(BusError):
    """The server refused this connection's user an operation (deploy/nats-server.conf gives
    each role only the subjects its job needs)."""


class RunSpecConflict(BusError):
    """A different RunSpec is already stored under this run id."""


@dataclass(frozen=True)
class Published:
    stream: str
    seq: int
    duplicate: bool  # the server already had this Nats-Msg-Id within the duplicate window


@dataclass(frozen=True)
class StreamState:
    messages: int  # stored now (a work queue drops acked ones)
    last_seq: int  # sequence of the newest message ever stored (0: none)
    first_seq: int = 0  # of the oldest message stored (last_seq + 1 when none is)
    bytes: int = 0  # stored now


@dataclass(frozen=True)
class ConsumerLag:
    num_pending: int  # in the stream, not yet delivered to this consumer
    num_ack_pending: int  # delivered, not yet acked
    num_redelivered: int
    ack_floor: int = 0  # stream sequence up to which everything is settled
    ack_wait_s: float = 0.0  # the consumer's settings (it may predate the caller)
    max_deliver: int = 0

    @property
    def outstanding(self) -> int:
        return self.num_pending + self.num_ack_pending


class Delivery(Protocol[R_co]):
    """One delivered record and the ways to settle it."""

    @property
    def record(self) -> R_co: ...

    @property
    def subject(self) -> str: ...

    @property
    def stream_seq(self) -> int: ...

    @property
    def deliveries(self) -> int:
        """How many times it was delivered (1 on the first delivery)."""
        ...

    async def ack(self) -> None: ...

    async def ack_sync(self) -> None:
        """Ack and wait for the server to confirm it (before an irreversible next step)."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Give it back for redelivery, after ``delay`` seconds if set (transient failure)."""
        ...

    async def in_progress(self) -> None:
        """Reset the ack timer: still working on it."""
        ...

    async def term(self) -> None:
        """Never redeliver."""
        ...

    async def dead_letter(self, reason: str, service: str) -> None:
        """Record why this can never succeed on the run's dead-letter subject, then terminate."""
        ...


class WorkConsumer(Protocol[R_co]):
    """A durable pull consumer shared by any number of workers (each message goes to one).
    Records that fail to decode are dead-lettered by ``fetch``, never returned."""

    subjects: RunSubjects
    kind: StreamKind
    durable: str

    async def fetch(self, batch: int = 100, timeout: float = 1.0) -> list[Delivery[R_co]]: ...

    def messages(
        self, batch: int = 100, timeout: float = 1.0, *, stop_when_idle: bool = False
    ) -> AsyncIterator[Delivery[R_co]]: ...

    async def lag(self) -> ConsumerLag: ...

    async def close(self) -> None: ...


class Bus(Protocol):
    """Typed publish, work queues, ordered log reads and a key-value map for one process."""

    config: BusConfig

    async def close(self) -> None: ...

    async def __aenter__(self) -> Bus: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def flush(self) -> None:
        """Wait until everything sent (acks are fire-and-forget) reached the server."""
        ...

    # streams
    async def ensure_streams(self, run_id: str) -> RunSubjects: ...

    async def delete_run_streams(self, run_id: str) -> None: ...

    async def stream_state(self, run_id: str, kind: StreamKind) -> StreamState:
        """``BusError`` when the stream does not exist (or the server cannot say)."""
        ...

    async def stream_depth(self, run_id: str, kind: StreamKind) -> int: ...

    # publishing
    async def publish(
        self, subject: str, record: Record, msg_id: str | None = None
    ) -> Published: ...

    async def publish_many(
        self, items: Iterable[tuple[str, Record, str | None]]
    ) -> list[Published]: ...

    async def dead_letter(
        self, run_id: str, subject: str, payload: bytes, reason: str, *, service: str,
        deliveries: int = 0, seq: int | None = None,
    ) -> Published: ...  # fmt: skip

    # work queues
    async def work_consumer(
        self, run_id: str, kind: StreamKind, durable: str, record_type: Any, *, service: str,
        filter_subject: str | None = None, ack_wait_s: float | None = None,
        max_deliver: int | None = None,
    ) -> WorkConsumer[Any]: ...  # fmt: skip

    async def consumer_lag(self, run_id: str, kind: StreamKind, durable: str) -> ConsumerLag:
        """``BusError`` when there is no such consumer (or the server cannot say)."""
        ...

    async def consumers(self, run_id: str, kind: StreamKind) -> list[str]:
        """The durable consumers of a run stream, by name."""
        ...

    def given_up(
        self, run_id: str, kind: StreamKind, durable: str
    ) -> AsyncIterator[tuple[int, int]]:
        """``(stream sequence, deliveries)`` of each message the consumer stopped redelivering
        after ``max_deliver`` unsettled attempts."""
        ...

    async def dead_letter_given_up(
        self, run_id: str, kind: StreamKind, seq: int, deliveries: int, *, service: str
    ) -> bool: ...

    async def stored_sequences(self, run_id: str, kind: StreamKind, subject: str) -> list[int]: ...

    # ordered reads (an unreadable message is dead-lettered and skipped, never raised)
    def read_log(
        self, stream: str, subject: str, record_type: Any, start_seq: int = 1, *,
        follow: bool = False, idle_timeout: float = 5.0,
    ) -> AsyncIterator[tuple[int, Any]]: ...  # fmt: skip

    def replay(
        self, run_id: str, split: Split, start_seq: int = 1, *, follow: bool = False,
        idle_timeout: float = 5.0,
    ) -> AsyncIterator[tuple[int, SampleRef | EndOfSplit]]: ...  # fmt: skip

    def records(
        self, run_id: str, kind: StreamKind, record_type: Any
    ) -> AsyncIterator[tuple[int, Any]]: ...

    async def last_entry(
        self, run_id: str, kind: StreamKind, record_type: Any
    ) -> tuple[int, Any] | None:
        """The newest readable record of a run stream (unreadable newer ones are skipped)."""
        ...

    async def last_record(self, run_id: str, kind: StreamKind, record_type: Any) -> Any | None: ...

    async def prompt_task(self, run_id: str, prompt_id: str) -> PromptTask | None:
        """The prompt log's task of ``prompt_id``; None when absent or unreadable."""
        ...

    # key-value (an unreadable value reads as absent, once dead-lettered)
    async def put_record(self, key: str, record: Record, *, create_only: bool = False) -> bool: ...

    async def get_record(self, key: str, record_type: Any) -> Any | None: ...

    async def records_by_prefix(self, prefix: str, record_type: Any) -> dict[str, Any]: ...

    async def put_run_spec(self, spec: RunSpec, *, replace: bool = False) -> RunSpec: ...

    async def get_run_spec(self, run_id: str) -> RunSpec | None: ...

    async def wait_for_record(
        self, key: str, record_type: Any, *, timeout: float | None = None, what: str = "",
        stop: Any = None, poll: float = 0.25,
    ) -> Any | None: ...  # fmt: skip
