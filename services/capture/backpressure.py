"""Capture slows down by itself when the trainers fall behind, using only what JetStream knows.

Outstanding samples = the samples stream's last sequence minus the lowest ``last_sequence`` any
still-training rank reported in its ``TrainerProgress`` KV record. Before any rank has reported,
it is the whole stream depth. Ranks whose record says ``done=True`` are ignored; when every rank
that reported is done nobody is left to wait for, so nothing is outstanding (pausing then would
only deadlock a late capture). The count includes both splits and the ``EndOfSplit`` markers
(a trainer's ``last_sequence`` is a position in the shared samples stream): an upper bound, which
is what a high-water mark needs.

The gate also watches the feature store's size (``capture.high_water_bytes`` /
``low_water_bytes``): a store that evicts when full (``mooncake://``) would otherwise drop
untrained samples silently. The size is what the store reports (``used_bytes()``; Mooncake: the
master's allocated bytes over every namespace, since eviction is store-wide). Bytes only go down
when consume-once training (``train.consume_features``) or ``specforge sweep`` deletes features,
so in a retained run the byte marks must sit above everything the run will hold.

``BackpressureGate.wait()`` is called before every fetch. When either measure is above its high
mark it pauses (one log line), re-checking every ``poll_s`` seconds; a measure holds capture from
above its high mark until it drops below its low mark (the gap keeps capture from flapping
around one threshold), and capture resumes when no measure holds it. A high mark ``<= 0`` turns
that measure off; ``low_water_bytes <= 0`` means half the high mark; a store that cannot report
its size turns the byte measure off (a warning).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from specforge_common.bus import Bus, BusError
from specforge_common.contracts import TrainerProgress
from specforge_common.log import get_logger
from specforge_common.subjects import progress_prefix

from .names import SERVICE


async def trainer_progress(bus: Bus, run_id: str) -> dict[int, TrainerProgress]:
    """Every rank's latest ``TrainerProgress`` of ``run_id`` (empty when none reported yet)."""
    records = await bus.records_by_prefix(progress_prefix(run_id), TrainerProgress)
    return {record.rank: record for record in records.values()}


async def outstanding_samples(bus: Bus, run_id: str) -> int:
    """Samples published but not yet trained on by the slowest rank still training."""
    state = await bus.stream_state(run_id, "samples")
    progress = await trainer_progress(bus, run_id)
    active = [p.last_sequence for p in progress.values() if not p.done]
    if not progress:
        return state.messages
    if not active:
        return 0
    return max(0, state.last_seq - min(active))


class BackpressureGate:
    """Pause fetching prompts while the trainers are too far behind or the store is too full
    (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        run_id: str,
        *,
        high_water: int,
        low_water: int,
        store: Any = None,
        high_water_bytes: int = 0,
        low_water_bytes: int = 0,
        poll_s: float = 1.0,
        check_interval_s: float = 0.5,
        log: Any = None,
    ) -> None:
        self.bus = bus
        self.run_id = run_id
        self.log = log or get_logger(service=SERVICE, run=run_id)
        self.high_water, self.low_water = high_water, self._low("samples", high_water, low_water)
        self.store = store
        self.high_water_bytes = high_water_bytes
        if low_water_bytes <= 0:  # unset: a pause would never end (a store never holds < 0)
            low_water_bytes = high_water_bytes // 2
        self.low_water_bytes = self._low("bytes", high_water_bytes, low_water_bytes)
        if high_water_bytes > 0 and not callable(getattr(store, "used_bytes", None)):
            self.log.warning(
                "capture.high_water_bytes is set but the feature store cannot report its size; "
                "byte backpressure is off",
                store=getattr(store, "uri", None),
            )
            self.high_water_bytes = 0
        self.poll_s = poll_s
        self.check_interval_s = check_interval_s
        self.paused = False
        self.checks = 0  # how many times the sample count was read (tests poll on it)
        self.byte_checks = 0  # how many times the store size was read
        self.rounds = 0  # completed reads of every measure (``wait_rounds``)
        self.last_outstanding: int | None = None
        self.last_used_bytes: int | None = None
        self._last_check = -float("inf")
        self._round_done = asyncio.Condition()

    def _low(self, what: str, high: int, low: int) -> int:
        if low > high > 0:
            self.log.warning(
                f"capture.low_water_{what} above high_water_{what}; using high_water for both",
                low_water=low,
                high_water=high,
            )
        return min(low, high)

    @property
    def enabled(self) -> bool:
        return self.high_water > 0 or self.high_water_bytes > 0

    async def check(self) -> int | None:
        """Read the outstanding count now; None (and a warning) if JetStream could not say."""
        try:
            value = await outstanding_samples(self.bus, self.run_id)
        except (BusError, asyncio.TimeoutError, OSError) as exc:
            self.log.warning("cannot read trainer backlog; not pausing", error=repr(exc))
            return None
        finally:
            self.checks += 1
            self._last_check = time.monotonic()
        self.last_outstanding = value
        return value

    async def check_bytes(self) -> int | None:
        """Read the store's size now (in a worker thread: it may be an HTTP call); None (and a
        warning, once per outage) if the store could not say."""
        error = None
        try:
            value = await asyncio.to_thread(self.store.used_bytes)
        except Exception as exc:  # a size probe must never kill capture
            value, error = None, repr(exc)
        self.byte_checks += 1
        self._last_check = time.monotonic()
        if value is None and (self.byte_checks == 1 or self.last_used_bytes is not None):
            self.log.warning(
                "cannot read the feature store's size; not pausing for it",
                store=getattr(self.store, "uri", None),
                error=error,
            )
        self.last_used_bytes = value
        return value

    def _measures(self) -> list[tuple[str, Callable[[], Awaitable[int | None]], int, int]]:
        measures = []
        if self.high_water > 0:
            measures.append(("samples", self.check, self.high_water, self.low_water))
        if self.high_water_bytes > 0:
            measures.append(("bytes", self.check_bytes, self.high_water_bytes,
                             self.low_water_bytes))  # fmt: skip
        return measures

    async def _update(self, held: set[str]) -> set[str]:
        """Re-read every measure: one holds capture from above its high mark until below its
        low mark; an unreadable one keeps its state."""
        for name, read, high, low in self._measures():
            value = await read()
            if value is not None and value > high:
                held.add(name)
            elif value is not None and value < low:
                held.discard(name)
        return held

    async def _finish_round(self) -> None:
        async with self._round_done:
            self.rounds += 1
            self._round_done.notify_all()

    async def wait_rounds(self, rounds: int) -> None:
        """Return once ``rounds`` reads of every measure have completed (state already updated):
        lets a caller synchronize with the gate without sleeping."""
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= rounds)

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Return True when capture may fetch, False if ``stop`` was set while paused.

        Not paused, the measures are re-read at most every ``check_interval_s`` seconds (a
        batch or two of overshoot past a high-water mark is the price of not querying JetStream
        and the store before every small fetch).
        """
        if not self.enabled:
            return True
        if time.monotonic() - self._last_check < self.check_interval_s:
            return True
        held = await self._update(set())
        if not held:
            await self._finish_round()
            return True
        self.paused = True
        await self._finish_round()
        started = time.monotonic()
        reason = ("trainers behind" if "samples" in held else "feature store full") + (
            ": pausing capture")  # fmt: skip
        self.log.info(
            reason,
            outstanding=self.last_outstanding,
            high_water=self.high_water,
            low_water=self.low_water,
            used_bytes=self.last_used_bytes,
            high_water_bytes=self.high_water_bytes or None,
            low_water_bytes=self.low_water_bytes if self.high_water_bytes else None,
        )
        try:
            while True:
                if stop is not None:
                    try:
                        await asyncio.wait_for(stop.wait(), self.poll_s)
                        return False
                    except asyncio.TimeoutError:
                        pass
                else:
                    await asyncio.sleep(self.poll_s)
                held = await self._update(held)
                if not held:
                    self.paused = False
                    self.log.info(
                        "backpressure relieved: resuming capture",
                        outstanding=self.last_outstanding,
                        used_bytes=self.last_used_bytes,
                        paused_s=round(time.monotonic() - started, 1),
                    )
                    return True
                await self._finish_round()
        finally:
            self.paused = False
            await self._finish_round()
