"""The backpressure gate against a real JetStream: SampleRefs and TrainerProgress records are
published directly, so the numbers the gate reads are exactly known."""

from __future__ import annotations

import asyncio

from specforge_capture.backpressure import BackpressureGate, outstanding_samples
from specforge_common.contracts import FeatureLocation, SampleRef, TrainerProgress
from specforge_common.subjects import progress_key


async def publish_refs(bus, run_id: str, n: int, start: int = 0) -> None:
    subjects = await bus.ensure_streams(run_id)
    location = FeatureLocation(uri="file:xx/none", tensors=(), nbytes=0, checksum="xxh3_128:0")
    items = []
    for i in range(start, start + n):
        ref = SampleRef(sample_id=f"s{i}", run_id=run_id, prompt_id=f"p{i}", split="train",
                        producer="test", features=location, num_tokens=1,
                        run_spec_hash="h")  # fmt: skip
        items.append((subjects.samples("train"), ref, f"s{i}"))
    await bus.publish_many(items)


async def set_progress(bus, run_id: str, rank: int, last_sequence: int, done: bool = False):
    record = TrainerProgress(run_id=run_id, rank=rank, step=1, samples_consumed=last_sequence,
                             last_sequence=last_sequence, done=done, run_spec_hash="h")  # fmt: skip
    await bus.put_record(progress_key(run_id, rank), record)


async def until(condition, timeout: float = 10.0, every: float = 0.01) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(every)


async def test_outstanding_is_stream_depth_before_any_trainer_reports(bus, run_id) -> None:
    await publish_refs(bus, run_id, 5)
    assert await outstanding_samples(bus, run_id) == 5


async def test_outstanding_follows_the_slowest_rank_still_training(bus, run_id) -> None:
    await publish_refs(bus, run_id, 10)
    await set_progress(bus, run_id, 0, 7)
    await set_progress(bus, run_id, 1, 4)
    await set_progress(bus, run_id, 2, 1, done=True)  # finished ranks do not hold capture back
    # A run whose id extends this one must not be read as this run's progress.
    await bus.ensure_streams(run_id + "x")
    await set_progress(bus, run_id + "x", 0, 0)
    assert await outstanding_samples(bus, run_id) == 10 - 4
    await set_progress(bus, run_id, 1, 9)  # the newest record of a rank counts
    assert await outstanding_samples(bus, run_id) == 10 - 7
    for rank in (0, 1):
        await set_progress(bus, run_id, rank, 9, done=True)
    assert await outstanding_samples(bus, run_id) == 0  # nobody left to wait for


async def test_gate_pauses_above_high_water_and_resumes_below_low_water(bus, run_id) -> None:
    await publish_refs(bus, run_id, 6)
    gate = BackpressureGate(bus, run_id, high_water=4, low_water=2, poll_s=0.02,
                            check_interval_s=0.0)  # fmt: skip
    waiting = asyncio.create_task(gate.wait())
    await until(lambda: gate.paused)
    assert gate.last_outstanding == 6

    await set_progress(bus, run_id, 0, 3)  # 3 outstanding: below high water, not below low
    checks = gate.checks
    await until(lambda: gate.checks >= checks + 3 and gate.last_outstanding == 3)
    assert gate.paused and not waiting.done()

    await set_progress(bus, run_id, 0, 5)  # 1 outstanding: below low water
    assert await asyncio.wait_for(waiting, 10) is True
    assert not gate.paused and gate.last_outstanding == 1

    # Between the marks and not paused: fetching goes on (hysteresis).
    await publish_refs(bus, run_id, 2, start=6)  # 3 outstanding
    assert await asyncio.wait_for(gate.wait(), 10) is True and not gate.paused


async def test_gate_stops_waiting_when_asked_and_can_be_disabled(bus, run_id) -> None:
    await publish_refs(bus, run_id, 3)
    gate = BackpressureGate(bus, run_id, high_water=1, low_water=1, poll_s=0.02,
                            check_interval_s=0.0)  # fmt: skip
    stop = asyncio.Event()
    waiting = asyncio.create_task(gate.wait(stop))
    await until(lambda: gate.paused)
    stop.set()
    assert await asyncio.wait_for(waiting, 10) is False

    off = BackpressureGate(bus, run_id, high_water=0, low_water=0)
    assert await asyncio.wait_for(off.wait(), 10) is True and off.checks == 0
