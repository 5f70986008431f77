"""The one rule of every read path, on both buses: a message that is no valid record of the type
asked for (random bytes, another kind, a newer major schema version) is dead-lettered with its
subject, sequence and reason, and reading goes on. No read raises ``ContractError``."""

from __future__ import annotations

import asyncio

import pytest

from specforge_common.bus import Bus, BusConfig, LocalBus, RunSpecConflict, open_bus
from specforge_common.contracts import (
    CheckpointEvent,
    EvalResult,
    FeatureLocation,
    PromptTask,
    RunSpec,
    SampleRef,
    TargetSpec,
    TensorSpec,
    TrainerProgress,
)
from specforge_common.subjects import RunSubjects, kv_subject, progress_key, progress_prefix
from tests.unreadable import (
    GARBAGE,
    assert_dead_lettered,
    dead_letters,
    garbage,
    publish_raw,
    put_raw,
)


@pytest.fixture(params=["nats", "local"])
async def bus(request: pytest.FixtureRequest, bus_config: BusConfig):
    if request.param == "local":
        yield LocalBus(bus_config)
        return
    connection = await open_bus(bus_config)
    yield connection
    await connection.close()


def sample(run_id: str, i: int) -> SampleRef:
    location = FeatureLocation(uri=f"mem://x/{i}", tensors=[TensorSpec("input_ids", "int64", [4])],
                               nbytes=32, checksum="0")  # fmt: skip
    return SampleRef(sample_id=f"s{i}", run_id=run_id, prompt_id=f"p{i}", split="train",
                     producer="t", features=location, num_tokens=4, run_spec_hash="h")  # fmt: skip


def evaluation(run_id: str, step: int) -> EvalResult:
    return EvalResult(run_id=run_id, step=step, checkpoint_sha256="0" * 64, acceptance_rates=[0.5],
                      run_spec_hash="h")  # fmt: skip


def progress(run_id: str, rank: int) -> TrainerProgress:
    return TrainerProgress(run_id=run_id, rank=rank, step=1, samples_consumed=2, last_sequence=3,
                           run_spec_hash="h")  # fmt: skip


@pytest.mark.parametrize("kind", GARBAGE)
async def test_a_log_read_dead_letters_the_message_and_reads_on(
    bus: Bus, run_id: str, kind: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    subject = subjects.samples("train")
    await bus.publish(subject, sample(run_id, 0), "s0")
    data = garbage(kind, sample(run_id, 9))
    seq = await publish_raw(bus, subject, data)
    await bus.publish(subject, sample(run_id, 1), "s1")

    assert [r.sample_id async for _, r in bus.replay(run_id, "train")] == ["s0", "s1"]
    followed = []
    reader = bus.replay(run_id, "train", follow=True, idle_timeout=0.2)
    async for _, record in reader:
        followed.append(record.sample_id)
        if len(followed) == 2:
            break
    await reader.aclose()
    assert followed == ["s0", "s1"]
    letters = await dead_letters(bus, run_id)
    assert_dead_lettered(letters, [(subject, seq, data)])
    assert len(letters) == 1  # read three times, dead-lettered once
    assert letters[(subject, seq)].service == bus.config.name


@pytest.mark.parametrize("kind", GARBAGE)
async def test_stream_records_and_the_last_record_skip_an_unreadable_one(
    bus: Bus, run_id: str, kind: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.evals, evaluation(run_id, 4))
    data = garbage(kind, evaluation(run_id, 8))
    seq = await publish_raw(bus, subjects.evals, data)  # the newest message of the stream

    assert [r.step async for _, r in bus.records(run_id, "evals", EvalResult)] == [4]
    assert (await bus.last_record(run_id, "evals", EvalResult)).step == 4
    last_seq, last = await bus.last_entry(run_id, "evals", EvalResult)
    assert (last_seq, last.step) == (seq - 1, 4)
    only_garbage = await publish_raw(bus, subjects.checkpoints, data)
    assert await bus.last_entry(run_id, "checkpoints", CheckpointEvent) is None
    rows = [(subjects.evals, seq, data), (subjects.checkpoints, only_garbage, data)]
    assert_dead_lettered(await dead_letters(bus, run_id), rows)


@pytest.mark.parametrize("kind", GARBAGE)
async def test_an_unreadable_prompt_log_entry_reads_as_absent(
    bus: Bus, run_id: str, kind: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    task = PromptTask(run_id=run_id, prompt_id="p0", split="train", input_ids=[1, 2])
    data = garbage(kind, task)
    seq = await publish_raw(bus, subjects.prompt_log("p0"), data)
    assert await bus.prompt_task(run_id, "p0") is None
    assert_dead_lettered(await dead_letters(bus, run_id), [(subjects.prompt_log("p0"), seq, data)])


@pytest.mark.parametrize("kind", GARBAGE)
async def test_an_unreadable_kv_record_reads_as_absent(bus: Bus, run_id: str, kind: str) -> None:
    await bus.ensure_streams(run_id)
    data = garbage(kind, progress(run_id, 0))
    revision = await put_raw(bus, progress_key(run_id, 0), data)
    await bus.put_record(progress_key(run_id, 1), progress(run_id, 1))

    assert await bus.get_record(progress_key(run_id, 0), TrainerProgress) is None
    found = await bus.records_by_prefix(progress_prefix(run_id), TrainerProgress)
    assert list(found) == [progress_key(run_id, 1)]
    with pytest.raises(Exception, match="no progress"):
        await bus.wait_for_record(progress_key(run_id, 0), TrainerProgress, timeout=0.3,
                                  what="progress")  # fmt: skip

    spec = RunSpec(run_id=run_id, target=TargetSpec(path="/m"))
    spec_data = garbage(kind, spec)
    spec_revision = await put_raw(bus, run_id, spec_data)
    assert await bus.get_run_spec(run_id) is None
    with pytest.raises(RunSpecConflict, match="unreadable"):  # never silently replaced
        await bus.put_run_spec(spec)
    assert await bus.put_run_spec(spec, replace=True) == spec == await bus.get_run_spec(run_id)
    assert_dead_lettered(await dead_letters(bus, run_id), [
        (kv_subject(progress_key(run_id, 0)), revision, data),
        (kv_subject(run_id), spec_revision, spec_data),
    ])  # fmt: skip


@pytest.mark.parametrize("kind", GARBAGE)
async def test_a_work_consumer_dead_letters_and_delivers_the_rest(
    bus: Bus, run_id: str, kind: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    task = PromptTask(run_id=run_id, prompt_id="p0", split="train", input_ids=[1, 2])
    data = garbage(kind, task)
    seq = await publish_raw(bus, subjects.prompts, data)
    await bus.publish(subjects.prompts, task, "p0")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="cap",
                                       filter_subject=subjects.prompts)  # fmt: skip
    got = await consumer.fetch(batch=10, timeout=2)
    assert [d.record.prompt_id for d in got] == ["p0"]
    await got[0].ack_sync()
    assert await consumer.fetch(batch=10, timeout=0.3) == []  # terminated, never redelivered
    await consumer.close()
    letters = await dead_letters(bus, run_id)
    assert_dead_lettered(letters, [(subjects.prompts, seq, data)])
    assert letters[(subjects.prompts, seq)].service == "cap"


async def test_a_restarted_reader_writes_no_second_letter(
    bus_config: BusConfig, run_id: str
) -> None:
    """The letter's message id is its subject and sequence: every process reads the bad
    message, the DLQ holds it once."""
    subjects = RunSubjects(run_id)
    data = garbage("random bytes", evaluation(run_id, 1))
    for _ in range(2):
        async with await open_bus(bus_config) as bus:
            await bus.ensure_streams(run_id)
            if not (await bus.stream_state(run_id, "evals")).messages:
                await publish_raw(bus, subjects.evals, data)
            assert [r async for _, r in bus.records(run_id, "evals", EvalResult)] == []
    async with await open_bus(bus_config) as bus:
        assert len(await dead_letters(bus, run_id)) == 1


async def test_a_reader_reads_on_when_the_letter_cannot_be_written(bus: Bus, run_id: str) -> None:
    """No DLQ stream (a run whose streams are gone): the read still skips the message."""
    await bus.ensure_streams(run_id)
    data = garbage("random bytes", progress(run_id, 0))
    await put_raw(bus, progress_key(run_id, 0), data)
    await bus.delete_run_streams(run_id)
    got = await asyncio.wait_for(bus.get_record(progress_key(run_id, 0), TrainerProgress), 10)
    assert got is None
