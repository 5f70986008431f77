"""Least privilege on the bus: a real nats-server runs the shipped ``deploy/nats-server.conf``,
each role does its whole job through the project's bus code without one refusal, and is refused
what belongs to another role; an anonymous client is refused outright."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
import pytest

from specforge_common.bus import BusError, BusPermissionError, open_bus
from specforge_common.bus.jetstream import JetStreamBus
from specforge_common.contracts import (
    CheckpointEvent,
    DeadLetter,
    EndOfSplit,
    EnqueueSummary,
    EvalResult,
    FeatureLocation,
    PromptTask,
    RunSpec,
    SampleRef,
    TargetSpec,
    TensorSpec,
    TrainerProgress,
)
from specforge_common.nats_server import NatsServer
from specforge_common.subjects import RunSubjects, enqueue_key, progress_key, progress_prefix
from tests.common.bus.roles import PASSWORDS, role_config, role_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with role_server(tmp_path_factory.mktemp("roles")) as running:
        yield running


async def connect(server: NatsServer, role: str) -> JetStreamBus:
    bus = await open_bus(role_config(server.url, role))
    assert isinstance(bus, JetStreamBus)
    return bus


def sample(run_id: str, i: int, split: str = "train") -> SampleRef:
    location = FeatureLocation(uri=f"mem://x/{i}", tensors=[TensorSpec("input_ids", "int64", [4])],
                               nbytes=32, checksum="0")  # fmt: skip
    return SampleRef(sample_id=f"s{i}", run_id=run_id, prompt_id=f"p{i}", split=split,
                     producer="t", features=location, num_tokens=4, run_spec_hash="h")  # fmt: skip


def checkpoint(run_id: str, step: int) -> CheckpointEvent:
    return CheckpointEvent(run_id=run_id, step=step, samples_consumed=2, last_sequence={0: 2},
                           checkpoint_uri="file:///nowhere", checkpoint_sha256="0" * 64,
                           run_spec_hash="h")  # fmt: skip


def prompt(run_id: str, i: int, split: str = "train", **over: Any) -> PromptTask:
    return PromptTask(run_id=run_id, prompt_id=f"p{i}", split=split, input_ids=[1, 2, 3],
                      **over)  # fmt: skip


async def enqueue_run(server: NatsServer, run_id: str) -> RunSubjects:
    """The enqueue role starts a run: streams first, then spec, prompts, prompt log, summary."""
    bus = await connect(server, "enqueue")
    try:
        subjects = await bus.ensure_streams(run_id)
        await bus.put_run_spec(RunSpec(run_id=run_id, target=TargetSpec(path="/models/t")))
        tasks = [prompt(run_id, 0), prompt(run_id, 1), prompt(run_id, 2, "eval")]
        items: list[tuple[str, Any, str | None]] = []
        for task in tasks:
            items.append((subjects.prompts, task, f"prompt:{run_id}:{task.prompt_id}"))
            items.append((subjects.prompt_log(task.prompt_id), task, None))
        await bus.publish_many(items)
        summary = EnqueueSummary(run_id=run_id, sources=["test"], train=2, eval=1, skipped=0,
                                 run_spec_hash="h")  # fmt: skip
        assert await bus.put_record(enqueue_key(run_id), summary, create_only=True)
        assert bus.refused_subjects == []
    finally:
        await bus.close()
    return subjects


async def test_each_role_does_its_job_without_a_refusal(server: NatsServer, run_id: str) -> None:
    subjects = await enqueue_run(server, run_id)

    capture = await connect(server, "capture")
    trainer = await connect(server, "trainer")
    evaluator = await connect(server, "evaluator")
    operator = await connect(server, "operator")
    try:
        # Capture: checks the streams, shares the durable consumers, publishes samples.
        await capture.ensure_streams(run_id)
        assert (await capture.get_run_spec(run_id)) is not None
        assert (await capture.get_record(enqueue_key(run_id), EnqueueSummary)) is not None
        work = await capture.work_consumer(run_id, "prompts", "capture", PromptTask,
                                           service="capture")  # fmt: skip
        recaptures = await capture.work_consumer(
            run_id, "prompts", "recapture", PromptTask, service="capture",
            filter_subject=subjects.recapture_prompts,
        )  # fmt: skip
        deliveries = await work.fetch(10, timeout=2.0)
        assert sorted(d.record.prompt_id for d in deliveries) == ["p0", "p1", "p2"]
        assert await capture.stored_sequences(run_id, "prompts", subjects.prompts)
        await deliveries[0].in_progress()
        await capture.publish_many(
            (subjects.samples(d.record.split), sample(run_id, i, d.record.split), f"s{i}")
            for i, d in enumerate(deliveries)
        )  # fmt: skip
        for d in deliveries[:2]:
            await d.ack_sync()
        await deliveries[2].dead_letter("test: never capturable", "capture")
        for split in ("train", "eval"):
            await capture.publish(subjects.samples(split), EndOfSplit(
                run_id=run_id, split=split, producer="t", samples_published=1,
                run_spec_hash="h"), msg_id=f"end:{run_id}:{split}")  # fmt: skip
        assert (await capture.consumer_lag(run_id, "prompts", "capture")).num_pending == 0
        assert (await capture.records_by_prefix(progress_prefix(run_id), TrainerProgress)) == {}
        assert not await capture.dead_letter_given_up(run_id, "prompts", 1, 5, service="capture")
        advisories = capture.given_up(run_id, "prompts", "capture")
        with pytest.raises(asyncio.TimeoutError):  # subscribed, and nothing was given up
            await asyncio.wait_for(advisories.__anext__(), 0.3)
        await advisories.aclose()

        # Trainer: replays the log, asks for a re-capture, reports progress, checkpoints.
        train = [r async for _, r in trainer.replay(run_id, "train")]
        assert [type(r).__name__ for r in train] == ["SampleRef", "SampleRef", "EndOfSplit"]
        assert (await trainer.prompt_task(run_id, "p1")) is not None
        await trainer.publish(subjects.recapture_prompts, prompt(run_id, 1, recapture=True))
        await trainer.put_record(progress_key(run_id, 0), TrainerProgress(
            run_id=run_id, rank=0, step=1, samples_consumed=2, last_sequence=2,
            run_spec_hash="h"))  # fmt: skip
        await trainer.publish(subjects.checkpoints, checkpoint(run_id, 1), msg_id="ckpt:1")
        assert (await trainer.stream_state(run_id, "samples")).messages == 5

        # Capture serves the re-capture request.
        again = await recaptures.fetch(1, timeout=2.0)
        assert [d.record.recapture for d in again] == [True]
        await capture.publish(subjects.recaptured, sample(run_id, 1))
        await again[0].ack_sync()

        # Evaluator: holds the checkpoints consumer, reads the eval split, publishes its result.
        checkpoints = await evaluator.work_consumer(
            run_id, "checkpoints", "evaluator", CheckpointEvent, service="evaluator"
        )
        events = await checkpoints.fetch(1, timeout=2.0)
        assert [e.record.step for e in events] == [1]
        evals = [r async for _, r in evaluator.replay(run_id, "eval")]
        assert len(evals) == 2
        await evaluator.publish(subjects.evals, EvalResult(
            run_id=run_id, step=1, checkpoint_sha256="0" * 64, acceptance_rates=[0.5],
            run_spec_hash="h"), msg_id="eval:1")  # fmt: skip
        await events[0].ack_sync()

        # The trainer's checkpoint manager reads the results.
        assert [r.step async for _, r in trainer.records(run_id, "evals", EvalResult)] == [1]
        assert (await trainer.last_record(run_id, "checkpoints", CheckpointEvent)) is not None

        for bus in (capture, trainer, evaluator):
            assert bus.refused_subjects == [], bus.config.user
        assert len([r async for r in operator.records(run_id, "dlq", DeadLetter)]) == 1
        await operator.delete_run_streams(run_id)
        with pytest.raises(BusError):
            await operator.stream_state(run_id, "samples")
    finally:
        for bus in (capture, trainer, evaluator, operator):
            await bus.close()


RunRefusal = Callable[[JetStreamBus, RunSubjects], Awaitable[object]]

REFUSALS: dict[str, tuple[str, RunRefusal]] = {
    "capture writes a checkpoint": (
        "capture", lambda b, s: b.publish(s.checkpoints, checkpoint(s.run_id, 9))),
    "capture deletes the run's streams": (
        "capture", lambda b, s: b.delete_run_streams(s.run_id)),
    "capture overwrites the run spec": (
        "capture", lambda b, s: b.put_record(s.run_id, RunSpec(run_id=s.run_id,
                                                               target=TargetSpec(path="/x")))),
    "evaluator publishes a sample": (
        "evaluator", lambda b, s: b.publish(s.samples("train"), sample(s.run_id, 9))),
    "evaluator publishes a checkpoint": (
        "evaluator", lambda b, s: b.publish(s.checkpoints, checkpoint(s.run_id, 9))),
    "trainer enqueues a prompt": (
        "trainer", lambda b, s: b.publish(s.prompts, prompt(s.run_id, 9))),
    "trainer publishes a sample": (
        "trainer", lambda b, s: b.publish_many([(s.samples("train"), sample(s.run_id, 9), None)])),
    "trainer writes the enqueue summary": (
        "trainer", lambda b, s: b.put_record(enqueue_key(s.run_id), EnqueueSummary(
            run_id=s.run_id, sources=[], train=0, eval=0, skipped=0, run_spec_hash="h"))),
    "enqueue writes a checkpoint": (
        "enqueue", lambda b, s: b.publish(s.checkpoints, checkpoint(s.run_id, 9))),
    "enqueue deletes the run's streams": (
        "enqueue", lambda b, s: b.delete_run_streams(s.run_id)),
    "capture creates another run's streams": (
        "capture", lambda b, s: b.ensure_streams(f"{s.run_id}-new")),
    "evaluator creates another run's streams": (
        "evaluator", lambda b, s: b.ensure_streams(f"{s.run_id}-new")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_a_role_is_refused_another_roles_work(
    server: NatsServer, run_id: str, case: str
) -> None:
    role, action = REFUSALS[case]
    subjects = await enqueue_run(server, run_id)
    bus = await connect(server, role)
    try:
        with pytest.raises(BusPermissionError, match=f"specforge-{role}"):
            await asyncio.wait_for(action(bus, subjects), 3.0)  # refused at once, not timed out
        assert bus.refused_subjects
    finally:
        await bus.close()
    operator = await connect(server, "operator")
    try:  # nothing changed: the streams are there, with what enqueue put in them
        for kind, count in (("prompts", 3), ("samples", 0), ("checkpoints", 0)):
            assert (await operator.stream_state(run_id, kind)).messages == count
    finally:
        await operator.close()


async def test_capture_cannot_purge_a_stream(server: NatsServer, run_id: str) -> None:
    """Purging is the operator's: the JetStream API subject itself is refused (raw client,
    since the bus has no purge)."""
    subjects = await enqueue_run(server, run_id)
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    nc = await nats.connect(server.url, user="specforge-capture",
                            password=PASSWORDS["capture"], error_cb=on_error)  # fmt: skip
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"$JS.API.STREAM.PURGE.{subjects.stream('prompts')}", b"",
                             timeout=1.0)  # fmt: skip
    finally:
        await nc.close()
    assert any("permissions violation" in e.lower() and "purge" in e.lower() for e in refused)
    operator = await connect(server, "operator")
    try:
        assert (await operator.stream_state(run_id, "prompts")).messages == 3
    finally:
        await operator.close()


@pytest.mark.parametrize(
    "user,password", [(None, None), ("specforge-capture", "wrong"), ("specforge", "x")]
)
async def test_anonymous_or_unknown_clients_are_refused(
    server: NatsServer, user: str | None, password: str | None
) -> None:
    config = role_config(server.url, "capture", user=user, password=password)
    with pytest.raises(BusError, match="cannot connect"):
        await open_bus(config)
    with pytest.raises(nats.errors.Error):  # a bare client too
        await nats.connect(server.url, max_reconnect_attempts=0, allow_reconnect=False,
                           connect_timeout=2)  # fmt: skip
