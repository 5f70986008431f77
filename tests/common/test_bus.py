"""The bus contract — dedup, redelivery, work sharing, replay, KV, DLQ — checked against a real
nats-server (``Bus``) and against the in-process ``LocalBus`` with the same tests: the colocated
path is only as good as its equivalence to JetStream. Tests that look at NATS itself take
``nats_bus``."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from specforge_common.bus import Bus, BusConfig, BusError, LocalBus, RunSpecConflict, open_bus
from specforge_common.contracts import (
    DeadLetter,
    EndOfSplit,
    FeatureLocation,
    PromptTask,
    RunSpec,
    SampleRef,
    TargetSpec,
    TensorSpec,
    decode,
)
from specforge_common.subjects import STREAM_KINDS, RunSubjects


@pytest.fixture(params=["nats", "local"])
async def bus(request: pytest.FixtureRequest, bus_config: BusConfig):
    """Each contract test runs on both implementations."""
    if request.param == "local":
        yield LocalBus(bus_config)
        return
    connection = await open_bus(bus_config)
    yield connection
    await connection.close()


@pytest.fixture
async def nats_bus(bus_config: BusConfig):
    async with await open_bus(bus_config) as connection:
        yield connection


async def publish_raw(bus: Bus | LocalBus, subject: str, data: bytes) -> None:
    """Bytes that bypass the contracts (a foreign or broken producer)."""
    if isinstance(bus, LocalBus):
        bus._append(subject, data, None)
    else:
        await bus.js.publish(subject, data)


def prompt(run_id: str, i: int) -> PromptTask:
    return PromptTask(run_id=run_id, prompt_id=f"p{i}", split="train", input_ids=[i, i + 1])


def sample(run_id: str, i: int, split: str = "train") -> SampleRef:
    return SampleRef(
        sample_id=f"s{i}",
        run_id=run_id,
        prompt_id=f"p{i}",
        split=split,
        producer="test",
        features=FeatureLocation(
            uri=f"mem:test/s{i}",
            tensors=(TensorSpec("hidden_states", "bfloat16", (1, 4, 8)),),
            nbytes=64,
            checksum="xxh3_128:0",
        ),
        num_tokens=4,
        run_spec_hash="h",
    )


async def test_ensure_streams_is_idempotent_and_sets_retention(nats_bus: Bus, run_id: str) -> None:
    bus = nats_bus
    subjects = await bus.ensure_streams(run_id)
    await bus.ensure_streams(run_id)
    for kind in STREAM_KINDS:
        info = await bus.js.stream_info(subjects.stream(kind))
        assert info.config.subjects == subjects.stream_subjects(kind)
        assert info.config.duplicate_window == pytest.approx(bus.config.duplicate_window_s)
    prompts = await bus.js.stream_info(subjects.stream("prompts"))
    samples = await bus.js.stream_info(subjects.stream("samples"))
    assert prompts.config.retention == "workqueue"
    assert samples.config.retention == "limits"


async def test_ensure_streams_updates_a_changed_duplicate_window(
    bus_config: BusConfig, run_id: str
) -> None:
    async with await open_bus(bus_config) as first:
        await first.ensure_streams(run_id)
    changed = BusConfig(servers=bus_config.servers, duplicate_window_s=120.0)
    async with await open_bus(changed) as second:
        subjects = await second.ensure_streams(run_id)
        info = await second.js.stream_info(subjects.stream("samples"))
        assert info.config.duplicate_window == pytest.approx(120.0)


async def test_republished_msg_id_is_deduplicated(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    first = await bus.publish(subjects.samples("train"), sample(run_id, 1), msg_id="s1")
    again = await bus.publish(subjects.samples("train"), sample(run_id, 1), msg_id="s1")
    other = await bus.publish(subjects.samples("train"), sample(run_id, 2), msg_id="s2")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.seq == first.seq and other.seq == first.seq + 1
    assert await bus.stream_depth(run_id, "samples") == 2

    batch = await bus.publish_many(
        [(subjects.samples("train"), sample(run_id, i), f"s{i}") for i in range(1, 5)]
    )
    assert [p.duplicate for p in batch] == [True, True, False, False]
    assert await bus.stream_depth(run_id, "samples") == 4


async def test_nak_redelivers_and_delay_holds_it_back(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.prompts, prompt(run_id, 0), msg_id="p0")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    (first,) = await consumer.fetch(batch=1, timeout=5)
    assert first.deliveries == 1 and first.record == prompt(run_id, 0)
    await first.nak()
    (second,) = await consumer.fetch(batch=1, timeout=5)
    assert second.deliveries == 2 and second.stream_seq == first.stream_seq

    loop = asyncio.get_running_loop()
    naked_at = loop.time()
    await second.nak(delay=1.0)
    assert await consumer.fetch(batch=1, timeout=0.4) == []
    (third,) = await consumer.fetch(batch=1, timeout=5)
    assert loop.time() - naked_at >= 0.9
    assert third.deliveries == 3
    await third.ack_sync()
    assert await consumer.fetch(batch=1, timeout=0.3) == []
    await consumer.close()


async def test_unacked_message_is_redelivered_after_ack_wait(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.prompts, prompt(run_id, 0), msg_id="p0")
    consumer = await bus.work_consumer(
        run_id, "prompts", "capture", PromptTask, service="t", ack_wait_s=1.0
    )
    (first,) = await consumer.fetch(batch=1, timeout=5)
    (again,) = await consumer.fetch(batch=1, timeout=10)  # never acked: comes back
    assert again.stream_seq == first.stream_seq and again.deliveries == 2
    await again.ack_sync()
    await consumer.close()


async def test_in_progress_postpones_redelivery_and_term_stops_it(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    for i in range(2):
        await bus.publish(subjects.prompts, prompt(run_id, i), msg_id=f"p{i}")
    consumer = await bus.work_consumer(
        run_id, "prompts", "capture", PromptTask, service="t", ack_wait_s=3.0
    )
    first, second = await consumer.fetch(batch=2, timeout=5)
    await second.term()
    # Keep `first` alive past several ack waits by heartbeating: nothing may come back.
    for _ in range(3):
        assert await consumer.fetch(batch=1, timeout=1.0) == []
        await first.in_progress()
    await first.ack_sync()
    assert await consumer.fetch(batch=2, timeout=3.5) == []  # termed one never returns
    await consumer.close()


async def test_work_queue_shared_by_two_workers_delivers_each_once(
    bus: Bus, bus_config: BusConfig, run_id: str
) -> None:
    n = 300
    local = isinstance(bus, LocalBus)

    def connect():  # a connection per worker on NATS; the one in-process bus otherwise
        return contextlib.nullcontext(bus) if local else _connect(bus_config)

    producer = bus
    subjects = await producer.ensure_streams(run_id)
    ready = [asyncio.Event(), asyncio.Event()]
    all_published = asyncio.Event()

    async def worker(index: int) -> list[str]:
        async with connect() as worker_bus:
            consumer = await worker_bus.work_consumer(
                run_id, "prompts", "capture", PromptTask, service=f"w{index}"
            )
            ready[index].set()
            # Each worker's first request asks for one message while two are published, so
            # both are guaranteed work; then they race for the rest.
            seen = [d async for d in _settled(await consumer.fetch(batch=1, timeout=10.0))]
            while True:
                batch = await consumer.fetch(batch=7, timeout=1.0)
                if not batch and all_published.is_set():
                    break
                seen += [d async for d in _settled(batch)]
            await consumer.close()
            return seen

    workers = [asyncio.create_task(worker(i)) for i in range(2)]
    await asyncio.gather(*(event.wait() for event in ready))
    items = [(subjects.prompts, prompt(run_id, i), f"p{i}") for i in range(n)]
    await producer.publish_many(items[:2])
    await producer.publish_many(items[2:])
    all_published.set()
    a, b = await asyncio.gather(*workers)
    assert len(a) + len(b) == n
    assert set(a).isdisjoint(b)
    assert set(a) | set(b) == {f"p{i}" for i in range(n)}
    assert a and b, "both workers should have received work"
    assert await producer.stream_depth(run_id, "prompts") == 0  # work queue: acked = removed


@contextlib.asynccontextmanager
async def _connect(config: BusConfig):
    async with await open_bus(config) as connection:
        yield connection


async def _settled(deliveries):
    """Ack each delivery (waiting for the server's confirmation) and yield its prompt id."""
    for delivery in deliveries:
        await delivery.ack_sync()
        yield delivery.record.prompt_id


async def test_replay_from_sequence_one_after_everything_was_consumed(
    bus: Bus, run_id: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    refs = [sample(run_id, i, split="train" if i % 3 else "eval") for i in range(30)]
    await bus.publish_many([(subjects.samples(r.split), r, r.sample_id) for r in refs])
    marker = EndOfSplit(
        run_id=run_id, split="train", producer="t", samples_published=20, run_spec_hash="h"
    )
    await bus.publish(subjects.samples("train"), marker)

    consumer = await bus.work_consumer(
        run_id, "samples", "trainer", SampleRef | EndOfSplit, service="t",
        filter_subject=subjects.samples("train"),
    )  # fmt: skip
    async for delivery in consumer.messages(batch=50, timeout=0.5, stop_when_idle=True):
        await delivery.ack()
    await consumer.close()
    assert (await bus.consumer_lag(run_id, "samples", "trainer")).outstanding == 0

    train = [(seq, rec) async for seq, rec in bus.replay(run_id, "train")]
    expected = [r for r in refs if r.split == "train"] + [marker]
    assert [rec for _, rec in train] == expected
    seqs = [seq for seq, _ in train]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    tail = [(seq, rec) async for seq, rec in bus.replay(run_id, "train", start_seq=seqs[10])]
    assert tail == train[10:]
    evals = [rec async for _, rec in bus.replay(run_id, "eval")]
    assert evals == [r for r in refs if r.split == "eval"]
    assert [x async for x in bus.replay(run_id, "train", start_seq=seqs[-1] + 1)] == []


async def test_replay_of_an_empty_split_ends_immediately(bus: Bus, run_id: str) -> None:
    await bus.ensure_streams(run_id)
    assert [x async for x in bus.replay(run_id, "eval")] == []


async def test_replay_follow_sees_records_published_later(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.samples("train"), sample(run_id, 0), "s0")
    reader = bus.replay(run_id, "train", follow=True, idle_timeout=0.5)
    seq0, first = await anext(reader)
    later = asyncio.ensure_future(anext(reader))
    await bus.publish(subjects.samples("train"), sample(run_id, 1), "s1")
    seq1, second = await asyncio.wait_for(later, timeout=10)
    assert (first.sample_id, second.sample_id) == ("s0", "s1") and seq1 == seq0 + 1
    await reader.aclose()


async def test_consumer_lag_counts_pending_and_unacked(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    await bus.publish_many([(subjects.prompts, prompt(run_id, i), f"p{i}") for i in range(10)])
    lag = await consumer.lag()
    assert (lag.num_pending, lag.num_ack_pending) == (10, 0)
    got = await consumer.fetch(batch=4, timeout=5)
    await got[0].ack_sync()
    lag = await consumer.lag()
    assert (lag.num_pending, lag.num_ack_pending, lag.outstanding) == (6, 3, 9)
    await consumer.close()


async def test_undecodable_message_goes_to_the_dlq_and_the_rest_flows(
    bus: Bus, run_id: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    await publish_raw(bus, subjects.prompts, b"\xc1 definitely not msgpack")
    await bus.publish(subjects.prompts, prompt(run_id, 1), "p1")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="cap")
    good = await consumer.fetch(batch=10, timeout=2)
    assert [d.record.prompt_id for d in good] == ["p1"]

    (letter,) = [r async for _, r in bus.records(run_id, "dlq", DeadLetter)]
    assert letter.payload == b"\xc1 definitely not msgpack"
    assert letter.subject == subjects.prompts and letter.service == "cap"
    assert "malformed" in letter.reason and letter.stream_sequence == 1

    await good[0].dead_letter("target refused the prompt", service="cap")
    letters = [r async for _, r in bus.records(run_id, "dlq", DeadLetter)]
    assert [x.reason for x in letters][1:] == ["target refused the prompt"]
    assert letters[1].stream_sequence == good[0].stream_seq
    assert await consumer.fetch(batch=10, timeout=0.3) == []  # dead-lettered = terminated
    await consumer.close()


async def test_run_spec_round_trips_through_kv(bus: Bus, run_id: str) -> None:
    spec = RunSpec(run_id=run_id, target=TargetSpec(path="/m"), seed=5)
    assert await bus.get_run_spec(run_id) is None
    await bus.put_run_spec(spec)
    assert await bus.get_run_spec(run_id) == spec
    await bus.put_run_spec(RunSpec(run_id=run_id, target=TargetSpec(path="/m"), seed=5))
    other = RunSpec(run_id=run_id, target=TargetSpec(path="/m"), seed=6)
    with pytest.raises(RunSpecConflict, match="different spec"):
        await bus.put_run_spec(other)
    await bus.put_run_spec(other, replace=True)
    assert await bus.get_run_spec(run_id) == other


async def test_connect_to_nothing_fails_clearly() -> None:
    import socket

    with socket.socket() as s:  # a port that is free now, with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BusError, match="cannot connect"):
        await open_bus(BusConfig(servers=(f"nats://127.0.0.1:{port}",), connect_timeout_s=1))


def test_subjects_are_per_run() -> None:
    a, b = RunSubjects("a"), RunSubjects("b")
    assert a.samples("train") == "sf.a.samples.train"
    assert a.stream("samples") == "SF_a_SAMPLES" != b.stream("samples")


async def test_records_and_last_record_of_a_run_stream(bus: Bus, run_id: str) -> None:
    from specforge_common.contracts import EvalResult

    subjects = await bus.ensure_streams(run_id)
    assert await bus.last_record(run_id, "evals", EvalResult) is None
    assert [r async for r in bus.records(run_id, "evals", EvalResult)] == []
    results = [
        EvalResult(
            run_id=run_id, step=s, checkpoint_sha256="x", acceptance_rates=[0.5], run_spec_hash="h"
        )  # fmt: skip
        for s in (0, 10, 20)
    ]
    for r in results:
        await bus.publish(subjects.evals, r, f"eval:{r.step}")
    assert [r async for _, r in bus.records(run_id, "evals", EvalResult)] == results
    assert await bus.last_record(run_id, "evals", EvalResult) == results[-1]


async def test_max_deliver_gives_up_on_a_message(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish_many([(subjects.prompts, prompt(run_id, i), f"p{i}") for i in range(2)])
    consumer = await bus.work_consumer(
        run_id, "prompts", "capture", PromptTask, service="t", max_deliver=2
    )
    deliveries = []
    for _ in range(2):
        got = await consumer.fetch(batch=2, timeout=5)
        bad = next(d for d in got if d.record.prompt_id == "p0")
        deliveries.append(bad.deliveries)
        for d in got:
            if d.record.prompt_id == "p1":
                await d.ack_sync()
        await bad.nak()
    assert deliveries == [1, 2]
    assert await consumer.fetch(batch=2, timeout=0.5) == []  # p0 is never delivered again
    await consumer.close()


async def test_stream_state_last_entry_and_ack_floor(bus: Bus, run_id: str) -> None:
    from specforge_common.contracts import CheckpointEvent

    subjects = await bus.ensure_streams(run_id)
    assert await bus.last_entry(run_id, "checkpoints", CheckpointEvent) is None
    events = [
        CheckpointEvent(
            run_id=run_id,
            step=s,
            final=s == 20,
            samples_consumed=s,
            last_sequence={0: s},
            checkpoint_uri=f"/c/{s}",
            checkpoint_sha256="x",
            run_spec_hash="h",
        )  # fmt: skip
        for s in (0, 10, 20)
    ]
    for e in events:
        await bus.publish(subjects.checkpoints, e, f"ckpt:{e.step}")
    state = await bus.stream_state(run_id, "checkpoints")
    assert (state.messages, state.last_seq) == (3, 3)
    assert await bus.last_entry(run_id, "checkpoints", CheckpointEvent) == (3, events[-1])

    consumer = await bus.work_consumer(run_id, "checkpoints", "ev", CheckpointEvent, service="t")
    first, second, third = await consumer.fetch(batch=3, timeout=5)
    await second.ack_sync()
    lag = await bus.consumer_lag(run_id, "checkpoints", "ev")
    assert lag.ack_floor == 0 and lag.num_ack_pending == 2  # seq 1 is still open
    await first.ack_sync()
    await third.ack_sync()
    await bus.flush()
    lag = await bus.consumer_lag(run_id, "checkpoints", "ev")
    assert lag.ack_floor == 3 and lag.outstanding == 0
    assert lag.max_deliver == bus.config.max_deliver
    assert lag.ack_wait_s == pytest.approx(bus.config.ack_wait_s)
    # a limits stream keeps acked messages; a work queue drops them
    assert (await bus.stream_state(run_id, "checkpoints")).messages == 3
    await consumer.close()


async def test_records_by_prefix_reads_only_that_prefix(bus: Bus, run_id: str) -> None:
    from specforge_common.contracts import TrainerProgress
    from specforge_common.subjects import progress_key, progress_prefix

    await bus.ensure_streams(run_id)
    assert await bus.records_by_prefix(progress_prefix(run_id), TrainerProgress) == {}
    records = {
        rank: TrainerProgress(
            run_id=run_id,
            rank=rank,
            step=rank,
            samples_consumed=0,
            last_sequence=0,
            run_spec_hash="h",
        )  # fmt: skip
        for rank in (0, 1)
    }
    for rank, record in records.items():
        await bus.put_record(progress_key(run_id, rank), record)
    await bus.put_record(f"{run_id}x.progress.0", records[0])  # another run, same start
    found = await bus.records_by_prefix(progress_prefix(run_id), TrainerProgress)
    assert found == {progress_key(run_id, r): rec for r, rec in records.items()}
    assert await bus.put_record(progress_key(run_id, 0), records[1], create_only=True) is False
    assert await bus.get_record(progress_key(run_id, 0), TrainerProgress) == records[0]


async def test_prompt_log_keeps_the_last_task_of_each_prompt_id(bus: Bus, run_id: str) -> None:
    """``prompt_task`` reads a prompt back after the work queue dropped it (re-capture)."""
    assert await bus.prompt_task(run_id, "p0") is None  # no streams yet
    subjects = await bus.ensure_streams(run_id)
    assert await bus.prompt_task(run_id, "p0") is None
    odd = "src/1:ü .>*"  # anything may be in a prompt id; the subject token is a hash of it
    first = PromptTask(run_id=run_id, prompt_id=odd, split="train", input_ids=[1, 2])
    second = PromptTask(run_id=run_id, prompt_id=odd, split="train", input_ids=[3, 4, 5])
    other = prompt(run_id, 7)
    await bus.publish(subjects.prompt_log(odd), first, msg_id="a")
    await bus.publish(subjects.prompt_log(other.prompt_id), other, msg_id="b")
    await bus.publish(subjects.prompt_log(odd), second, msg_id="c")
    assert await bus.prompt_task(run_id, odd) == second
    assert await bus.prompt_task(run_id, "p7") == other
    assert await bus.prompt_task(run_id, "p8") is None
    assert await bus.stream_depth(run_id, "promptlog") == 2  # one message per prompt id
    assert subjects.prompt_log(odd).startswith(f"sf.{run_id}.promptlog.")
    assert len(subjects.prompt_log(odd).split(".")) == 4
    await bus.delete_run_streams(run_id)  # the prompt log goes with the run's other streams
    assert await bus.prompt_task(run_id, odd) is None


async def test_recapture_requests_have_their_own_consumer_on_the_prompts_queue(
    bus: Bus, run_id: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish_many([(subjects.prompts, prompt(run_id, i), f"p{i}") for i in range(3)])
    again = PromptTask(run_id=run_id, prompt_id="p1", split="train", input_ids=[1, 2],
                       recapture=True, attempt=1)  # fmt: skip
    await bus.publish(subjects.recapture_prompts, again, msg_id="recapture:s1:1")
    main = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    side = await bus.work_consumer(run_id, "prompts", "recapture", PromptTask, service="t",
                                   filter_subject=subjects.recapture_prompts)  # fmt: skip
    got = await side.fetch(batch=10, timeout=5)
    assert [d.record for d in got] == [again]
    await got[0].ack_sync()
    got = await main.fetch(batch=10, timeout=5)
    assert [d.record.prompt_id for d in got] == ["p0", "p1", "p2"]
    assert not any(d.record.recapture for d in got)
    for d in got:
        await d.ack_sync()
    await bus.flush()
    assert await bus.stream_depth(run_id, "prompts") == 0
    assert (await main.lag()).outstanding == (await side.lag()).outstanding == 0
    await main.close()
    await side.close()


async def test_a_message_never_settled_is_given_up_then_dead_lettered_once(
    bus: Bus, run_id: str
) -> None:
    """A worker that dies on a message (fetch, never settle) max_deliver times: the bus says so
    (JetStream's advisory), and dead-lettering it empties the work queue; a second worker
    handling the same advisory finds it gone."""
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.prompts, prompt(run_id, 0), "p0")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t",
                                       ack_wait_s=0.5, max_deliver=2)  # fmt: skip
    advisories = bus.given_up(run_id, "prompts", "capture")
    waiting = asyncio.ensure_future(anext(advisories))
    for attempt in (1, 2):  # each "crash" drops the delivery unsettled
        (dropped,) = await consumer.fetch(batch=1, timeout=5)
        assert dropped.deliveries == attempt
    while not waiting.done():  # the in-process bus notices on its next fetch, NATS by a timer
        assert await consumer.fetch(batch=1, timeout=0.3) == []
    seq, deliveries = await asyncio.wait_for(waiting, timeout=10)
    assert (seq, deliveries) == (dropped.stream_seq, 2)
    lag = await consumer.lag()
    assert lag.outstanding == 0 and await bus.stream_depth(run_id, "prompts") == 1  # still there
    assert await bus.dead_letter_given_up(run_id, "prompts", seq, deliveries, service="cap")
    assert not await bus.dead_letter_given_up(run_id, "prompts", seq, deliveries, service="cap")
    assert await bus.stream_depth(run_id, "prompts") == 0
    (letter,) = [r async for _, r in bus.records(run_id, "dlq", DeadLetter)]
    assert letter.stream_sequence == seq and letter.deliveries == 2
    assert "never settled" in letter.reason and decode(letter.payload, PromptTask).prompt_id == "p0"
    await advisories.aclose()
    await consumer.close()


async def test_replay_dead_letters_an_undecodable_message_and_reads_on(
    bus: Bus, run_id: str
) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.samples("train"), sample(run_id, 0), "s0")
    await publish_raw(bus, subjects.samples("train"), b"\xc1 broken")
    await bus.publish(subjects.samples("train"), sample(run_id, 1), "s1")

    for _ in range(2):  # every read skips it; the second writes no second letter
        got = [(seq, r.sample_id) async for seq, r in bus.replay(run_id, "train")]
        assert got == [(1, "s0"), (3, "s1")]
    (letter,) = [r async for _, r in bus.records(run_id, "dlq", DeadLetter)]
    assert (letter.subject, letter.stream_sequence) == (subjects.samples("train"), 2)
    assert letter.payload == b"\xc1 broken" and "unreadable record" in letter.reason


async def test_a_message_waiting_out_a_nak_delay_is_still_ack_pending(
    bus: Bus, run_id: str
) -> None:
    """What end-of-data detection relies on: a prompt backing off after a failure is not done."""
    subjects = await bus.ensure_streams(run_id)
    await bus.publish(subjects.prompts, prompt(run_id, 0), "p0")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    (delivery,) = await consumer.fetch(batch=1, timeout=5)
    await delivery.nak(delay=30.0)
    await bus.flush()
    lag = await consumer.lag()
    assert (lag.num_pending, lag.num_ack_pending) == (0, 1)
    await consumer.close()


async def test_stored_sequences_walks_one_subject_of_a_work_queue(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    await bus.publish_many([(subjects.prompts, prompt(run_id, i), f"p{i}") for i in range(3)])
    # the same stream, another subject:
    await bus.publish(subjects.recapture_prompts, prompt(run_id, 9), "r9")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    first, *_ = await consumer.fetch(batch=1, timeout=5)
    await first.ack_sync()  # a work queue forgets it
    assert await bus.stored_sequences(run_id, "prompts", subjects.prompts) == [2, 3]
    assert await bus.stored_sequences(run_id, "prompts", subjects.recapture_prompts) == [4]
    await consumer.close()
