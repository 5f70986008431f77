"""The in-memory model of JetStream that ``LocalBus`` runs on: streams with
sequences and per-message-id dedup, and the delivery state of a durable work consumer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..subjects import matches


@dataclass
class Message:
    seq: int
    subject: str
    data: bytes


@dataclass
class Stream:
    name: str
    subjects: list[str]
    work_queue: bool
    one_per_subject: bool = False  # JetStream's max_msgs_per_subject=1
    messages: dict[int, Message] = field(default_factory=dict)  # insertion = sequence order
    last_seq: int = 0
    msg_ids: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (seq, when)
    last_by_subject: dict[str, int] = field(default_factory=dict)  # subject -> newest seq


@dataclass
class Pending:
    deliveries: int = 0
    ready_at: float = 0.0  # monotonic time it may be (re)delivered
    in_flight: bool = False
    given_up: bool = False  # max_deliver reached without a settle: announced once


@dataclass
class ConsumerState:
    stream: Stream
    durable: str
    filter_subject: str
    ack_wait_s: float
    max_deliver: int
    state: dict[int, Pending] = field(default_factory=dict)  # seq -> delivery state
    settled: set[int] = field(default_factory=set)  # acked or terminated (limits streams)
    redelivered: int = 0
    advisories: list[asyncio.Queue[tuple[int, int]]] = field(default_factory=list)

    def give_up(self, seq: int, pending: Pending) -> None:
        """Like JetStream's max-deliveries advisory: tell every ``given_up`` listener, once."""
        if not pending.given_up:
            pending.given_up = True
            for queue in self.advisories:
                queue.put_nowait((seq, pending.deliveries))

    def wanted(self, message: Message) -> bool:
        return matches(self.filter_subject, message.subject) and message.seq not in self.settled

    def settle(self, seq: int) -> None:
        self.state.pop(seq, None)
        self.settled.add(seq)
        if self.stream.work_queue:  # a work queue forgets what its consumer acknowledged
            self.stream.messages.pop(seq, None)

    @property
    def ack_floor(self) -> int:
        """Highest sequence with everything at or below it settled (or filtered out)."""
        for seq, message in self.stream.messages.items():
            if self.wanted(message):
                return seq - 1
        return self.stream.last_seq
