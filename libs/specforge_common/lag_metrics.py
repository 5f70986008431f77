"""How far behind its stream a service is, as Prometheus gauges refreshed by a background task.

Lag is read with the bus calls ``specforge status`` uses: a durable consumer's pending and
unacked counts (``Bus.consumer_lag``); for an ordered reader (the trainer reads the samples log
from a position of its own, with no durable consumer) the stream's last sequence minus that
position (``Bus.stream_state``), which counts every message after it, both splits and markers,
as the capture's backpressure does: an upper bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .aio import in_background
from .bus import Bus, BusError
from .subjects import RunSubjects, StreamKind

LABELS = ("run", "stream", "consumer")


@dataclass(frozen=True)
class LagSource:
    """One reader of a run stream: a durable consumer, or (``position`` set) an ordered reader
    whose last stream sequence read ``position()`` returns."""

    run_id: str  # the stream's owner (a replayed run's trainer reads its data run's samples)
    kind: StreamKind
    consumer: str
    position: Callable[[], int] | None = None


async def read_lag(bus: Bus, source: LagSource) -> tuple[int, int]:
    """``(pending, unacked)`` of ``source`` now; ``BusError`` when the server cannot say."""
    if source.position is None:
        lag = await bus.consumer_lag(source.run_id, source.kind, source.consumer)
        return lag.num_pending, lag.num_ack_pending
    state = await bus.stream_state(source.run_id, source.kind)
    return max(0, state.last_seq - source.position()), 0


class LagGauges:
    """``specforge_bus_consumer_pending`` / ``_ack_pending`` of a service's readers."""

    def __init__(self, registry: CollectorRegistry, run_id: str) -> None:
        self.run_id = run_id
        self.pending = Gauge(
            "specforge_bus_consumer_pending",
            "Messages of the stream not yet delivered to this consumer (an ordered reader: "
            "stream sequences after its position)",
            LABELS,
            registry=registry,
        )
        self.ack_pending = Gauge(
            "specforge_bus_consumer_ack_pending",
            "Messages delivered to this consumer and not yet acked",
            LABELS,
            registry=registry,
        )
        self.errors = Counter(
            "specforge_bus_lag_errors_total",
            "Lag reads the server could not answer (a consumer not created yet, a broker away)",
            ["run"],
            registry=registry,
        ).labels(run=run_id)

    async def refresh(self, bus: Bus, sources: Sequence[LagSource]) -> None:
        """Read every source now; one that cannot be read keeps its last value."""
        for source in sources:
            try:
                pending, unacked = await read_lag(bus, source)
            except (BusError, asyncio.TimeoutError, OSError):
                self.errors.inc()
                continue
            labels = {"run": self.run_id, "stream": RunSubjects(source.run_id).stream(source.kind),
                      "consumer": source.consumer}  # fmt: skip
            self.pending.labels(**labels).set(pending)
            self.ack_pending.labels(**labels).set(unacked)

    @asynccontextmanager
    async def polling(
        self, bus: Bus, sources: Sequence[LagSource], every_s: float,
        on_error: Callable[[BaseException], Any],
    ) -> AsyncIterator[None]:  # fmt: skip
        """Refresh on entry (before the block runs), every ``every_s`` seconds during it, and
        once more at its end (the last values a scrape sees are the final ones). ``on_error``
        gets any other exception; polling goes on."""

        async def refreshed() -> None:
            try:
                await self.refresh(bus, sources)
            except Exception as exc:
                on_error(exc)

        async def poll() -> None:
            while True:
                await asyncio.sleep(every_s)
                await refreshed()

        await refreshed()
        async with in_background(poll()):
            yield
        await refreshed()
