"""Capture's side of re-capture, against a real nats-server, the tiny target and a file store:
a ``recapture=True`` task is captured again and announced on ``sf.<run>.samples.recaptured``
(never on the split's log), also while backpressure holds the main loop; and a worker told to
exit when done stays up while a trainer of its run is still training."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import torch

from specforge_capture.names import DURABLE, RECAPTURE_DURABLE
from specforge_common.bus import Bus
from specforge_common.contracts import SampleRef, TrainerProgress
from specforge_common.data.enqueue import publish_prompts
from specforge_common.featurestore import open_store
from specforge_common.subjects import RunSubjects, progress_key
from tests.capture.test_worker import (
    TIMEOUT,
    make_spec,
    new_worker,
    samples_log,
    start_run,
    token_tasks,
    until,
    write_summary,
)


def progress(spec, *, done: bool) -> TrainerProgress:
    return TrainerProgress(run_id=spec.run_id, rank=0, step=0, samples_consumed=0,
                           last_sequence=0, done=done, run_spec_hash=spec.spec_hash())  # fmt: skip


async def test_a_recapture_goes_to_the_recaptured_subject_even_while_capture_is_paused(
    bus: Bus, run_id: str, target_dir: Path, engine, tmp_path: Path
) -> None:
    # One row per forward: the re-capture is then bit-identical to the first capture (CPU).
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=1, high_water_samples=2,
                     low_water_samples=1)  # fmt: skip
    tasks = token_tasks(spec, 5, seed=3)
    subjects = await bus.ensure_streams(run_id)
    await bus.put_run_spec(spec)
    await publish_prompts(bus, tasks)
    await write_summary(bus, spec, tasks)
    # A finished trainer: nothing outstanding, so the first worker is never paused.
    await bus.put_record(progress_key(run_id, 0), progress(spec, done=True))
    await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)
    refs, ends = await samples_log(bus, run_id)
    lost = next(r for r in refs if r.split == "train")
    store = open_store(spec.store_uri)
    original = store.get(lost.features)
    store.delete(lost.features)

    # A trainer at sequence 0: far above high water, the second worker's main loop pauses.
    await bus.put_record(progress_key(run_id, 0), progress(spec, done=False))
    worker = new_worker(bus, spec, engine, producer_id="w1", backpressure_poll_s=0.05)
    running = asyncio.create_task(worker.run())

    async def paused() -> bool:
        return worker.gate.paused

    await until(paused)
    task = await bus.prompt_task(run_id, lost.prompt_id)
    assert task is not None and not task.recapture
    request = msgspec.structs.replace(task, recapture=True, attempt=1)
    await bus.publish(subjects.recapture_prompts, request, f"recapture:{lost.sample_id}:1")

    async def recaptured() -> bool:
        return worker.stats.recaptured == 1

    await until(recaptured)
    assert worker.gate.paused  # served while backpressure held the prompt queue
    worker.stop()
    stats = await asyncio.wait_for(running, TIMEOUT)

    stream = subjects.stream("samples")
    announced = [x async for x in bus.read_log(stream, subjects.recaptured, SampleRef)]
    assert len(announced) == 1
    seq, ref = announced[0]
    assert (ref.sample_id, ref.prompt_id, ref.split) == (lost.sample_id, lost.prompt_id, "train")
    assert ref.producer == "w1" and ref.run_spec_hash == spec.spec_hash()
    msg = await bus.js.get_msg(stream, seq)
    assert msg.headers["Nats-Msg-Id"] == f"recaptured:{lost.sample_id}:1"
    again = store.get(ref.features)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)

    # The split logs and their markers are untouched; nothing counts toward the end of data.
    assert await samples_log(bus, run_id) == (refs, ends)
    assert stats.samples_published == {"train": 0, "eval": 0}
    assert (stats.recaptured, stats.prompts_captured, stats.dead_lettered) == (1, 1, 0)
    for durable in (DURABLE, RECAPTURE_DURABLE):
        assert (await bus.consumer_lag(run_id, "prompts", durable)).outstanding == 0


async def test_exit_when_done_waits_until_the_trainers_finish(
    bus: Bus, run_id: str, target_dir: Path, engine, tmp_path: Path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    await start_run(bus, spec, token_tasks(spec, 3, seed=4), summary=True)
    await bus.put_record(progress_key(run_id, 0), progress(spec, done=False))
    worker = new_worker(bus, spec, engine)  # exit_when_done=True
    running = asyncio.create_task(worker.run())

    async def ended() -> bool:
        return worker.stats.end_published

    await until(ended)
    mark = worker.stats.empty_fetches

    async def idled() -> bool:
        return worker.stats.empty_fetches >= mark + 3

    await until(idled)  # several empty fetches past the end of data, still running
    assert not running.done()
    await bus.put_record(progress_key(run_id, 0), progress(spec, done=True))
    stats = await asyncio.wait_for(running, TIMEOUT)
    assert stats.prompts_captured == 3 and stats.end_published
    refs, _ = await samples_log(bus, run_id)
    assert len(refs) == 3 and not [x async for x in bus.read_log(
        RunSubjects(run_id).stream("samples"), RunSubjects(run_id).recaptured, SampleRef
    )]  # fmt: skip
