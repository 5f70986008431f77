"""JetStream's side of a work queue: the durable pull consumer and its deliveries."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic

import nats.errors
from nats.aio.msg import Msg

from ..contracts import ContractError, decode
from ..subjects import RunSubjects, StreamKind
from .protocol import R
from .reads import ConsumerReads

if TYPE_CHECKING:
    from .jetstream import JetStreamBus


def stream_sequence(msg: Msg) -> int:
    """Stream sequence from the JetStream ack subject, without nats-py's Metadata objects
    (building those costs more than decoding the record on the hot path)."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form with
    # <domain>.<account hash> after ACK and an optional trailing token.
    tokens = msg.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class JetStreamDelivery(Generic[R]):
    """One delivered record and the ways to settle it (``protocol.Delivery``)."""

    __slots__ = ("record", "subject", "_msg", "_consumer")

    def __init__(self, record: R, msg: Msg, consumer: JetStreamWorkConsumer[R]) -> None:
        self.record = record
        self.subject = msg.subject
        self._msg = msg
        self._consumer = consumer

    @property
    def stream_seq(self) -> int:
        return stream_sequence(self._msg)

    @property
    def deliveries(self) -> int:
        """How many times the server has delivered this message (1 on the first delivery)."""
        return self._msg.metadata.num_delivered

    async def ack(self) -> None:
        await self._msg.ack()

    async def ack_sync(self) -> None:
        await self._msg.ack_sync()

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self._msg.in_progress()

    async def term(self) -> None:
        await self._msg.term()

    async def dead_letter(self, reason: str, service: str) -> None:
        await self._consumer.dead_letter(self._msg, reason)
        await self._msg.term()


class JetStreamWorkConsumer(ConsumerReads, Generic[R]):
    """A durable pull consumer (``protocol.WorkConsumer``)."""

    def __init__(
        self,
        bus: JetStreamBus,
        subjects: RunSubjects,
        kind: StreamKind,
        durable: str,
        record_type: Any,
        sub: Any,
        service: str,
    ) -> None:
        self.bus = bus
        self.subjects = subjects
        self.kind = kind
        self.durable = durable
        self.record_type = record_type
        self.service = service
        self._sub = sub

    async def fetch(self, batch: int = 100, timeout: float = 1.0) -> list[JetStreamDelivery[R]]:
        """Up to ``batch`` deliveries; an empty list when nothing arrived within ``timeout``."""
        try:
            msgs = await self._sub.fetch(batch=batch, timeout=timeout)
        except asyncio.TimeoutError:  # nats-py raises its own subclass or the plain one
            return []
        out: list[JetStreamDelivery[R]] = []
        for msg in msgs:
            try:
                record = decode(msg.data, self.record_type, subject=msg.subject)
            except ContractError as exc:  # the bus's one rule: dead-letter, then never again
                deliveries, seq = _position(msg)
                if await self.bus.dead_letter_unreadable(
                    msg.subject, seq, msg.data, exc, service=self.service, deliveries=deliveries
                ):  # fmt: skip
                    await msg.term()
                continue  # not written: redelivered after the ack wait, and tried again
            out.append(JetStreamDelivery(record, msg, self))
        return out

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        deliveries, seq = _position(msg)
        await self.bus.dead_letter(self.subjects.run_id, msg.subject, msg.data, reason,
                                   service=self.service, deliveries=deliveries,
                                   seq=seq)  # fmt: skip

    async def close(self) -> None:
        # Unsubscribing first keeps a later drain from hanging on an expired fetch.
        try:
            await self._sub.unsubscribe()
        except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
            pass


def _position(msg: Msg) -> tuple[int, int | None]:
    """``(deliveries, stream sequence)`` of a delivered message, ``(0, None)`` if unknown."""
    try:
        meta = msg.metadata
        return meta.num_delivered, meta.sequence.stream
    except (nats.errors.NotJSMessageError, AttributeError, IndexError):
        return 0, None
