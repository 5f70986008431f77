"""Capture slows down by itself when the trainers fall behind, using only what JetStream knows.

Outstanding samples = the samples stream's last sequence minus the lowest ``last_sequence`` any
still-training rank reported in its ``TrainerProgress`` KV record. Before any rank has reported,
it is the whole stream depth. Ranks whose record says ``done=True`` are ignored; when every rank
that reported is done nobody is left to wait for, so nothing is outstanding (pausing then would
only deadlock a late capture). The count includes both splits and the ``EndOfSplit`` markers
(a trainer's ``last_sequence`` is a position in the shared samples stream): an upper bound, which
is what a high-water mark needs.

``BackpressureGate.wait()`` is called before every fetch. Above ``high_water`` it pauses (one log
line), re-checking every ``poll_s`` seconds, until the count drops below ``low_water``; the gap
between the two marks keeps capture from flapping around one threshold. ``high_water <= 0``
turns the gate off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats.errors
import nats.js.errors

from specforge_common.bus import Bus
from specforge_common.contracts import TrainerProgress
from specforge_common.log import get_logger
from specforge_common.subjects import progress_prefix


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
    """Pause fetching prompts while the trainers are too far behind (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        run_id: str,
        *,
        high_water: int,
        low_water: int,
        poll_s: float = 1.0,
        check_interval_s: float = 0.5,
        log: Any = None,
    ) -> None:
        self.bus = bus
        self.run_id = run_id
        self.high_water = high_water
        self.low_water = min(low_water, high_water)
        self.poll_s = poll_s
        self.check_interval_s = check_interval_s
        self.log = log or get_logger(service="capture", run=run_id)
        if low_water > high_water:
            self.log.warning(
                "capture.low_water_samples above high_water_samples; using high_water for both",
                low_water=low_water,
                high_water=high_water,
            )
        self.paused = False
        self.checks = 0  # how many times the count was read (tests poll on it)
        self.last_outstanding: int | None = None
        self._last_check = -float("inf")

    @property
    def enabled(self) -> bool:
        return self.high_water > 0

    async def check(self) -> int | None:
        """Read the outstanding count now; None (and a warning) if JetStream could not say."""
        try:
            value = await outstanding_samples(self.bus, self.run_id)
        except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as exc:
            self.log.warning("cannot read trainer backlog; not pausing", error=repr(exc))
            return None
        finally:
            self.checks += 1
            self._last_check = time.monotonic()
        self.last_outstanding = value
        return value

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Return True when capture may fetch, False if ``stop`` was set while paused.

        Not paused, the count is re-read at most every ``check_interval_s`` seconds (a batch or
        two of overshoot past the high-water mark is the price of not querying JetStream before
        every small fetch).
        """
        if not self.enabled:
            return True
        if time.monotonic() - self._last_check < self.check_interval_s:
            return True
        value = await self.check()
        if value is None or value <= self.high_water:
            return True
        self.paused = True
        started = time.monotonic()
        self.log.info(
            "trainers behind: pausing capture",
            outstanding=value,
            high_water=self.high_water,
            low_water=self.low_water,
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
                value = await self.check()
                if value is not None and value < self.low_water:
                    self.log.info(
                        "trainers caught up: resuming capture",
                        outstanding=value,
                        paused_s=round(time.monotonic() - started, 1),
                    )
                    return True
        finally:
            self.paused = False
