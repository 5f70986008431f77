"""CaptureWorker in-process against a real nats-server, a real tiny target and a file:// store.

PromptTasks are published by the tests themselves (not by the enqueue command), and the expected
features are computed here with an independent single-row ``engine.capture`` of the same tokens.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import msgspec
import torch

from specforge_capture.prepare import decode_seed
from specforge_capture.worker import CaptureWorker
from specforge_common.bus import Bus, LocalBus, open_bus
from specforge_common.contracts import (
    CaptureSpec,
    DeadLetter,
    EndOfSplit,
    EnqueueSummary,
    Message,
    PromptTask,
    RunSpec,
    SampleRef,
    decode,
)
from specforge_common.featurestore import open_store
from specforge_common.subjects import RunSubjects, enqueue_key
from specforge_common.targets import HFTargetEngine
from tests.support import tiny_run_spec

TIMEOUT = 30.0


# --- helpers --------------------------------------------------------------------------------


def expected_sample_id(run_id: str, prompt_id: str, spec_hash: str) -> str:
    """The shared brief's rule, written independently of the worker's code."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id)[:64]
    return f"{safe}-{hashlib.sha256(f'{run_id}:{prompt_id}:{spec_hash}'.encode()).hexdigest()[:16]}"


def make_spec(run_id: str, target_dir: Path, workdir: Path, **capture: object) -> RunSpec:
    settings = {"batch_size": 4, "max_batch_tokens": 96} | capture
    return tiny_run_spec(run_id, target_dir, workdir, capture=CaptureSpec(**settings))


def token_tasks(spec: RunSpec, n: int, *, seed: int = 0, first: int = 0) -> list[PromptTask]:
    """Random prefill tasks, 6-40 tokens, the last two thirds supervised, every third eval."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(first, first + n):
        length = int(torch.randint(6, 41, (1,), generator=gen))
        ids = torch.randint(3, 500, (length,), generator=gen).tolist()  # 500+: poison
        mask = [0] * (length // 3) + [1] * (length - length // 3)
        tasks.append(
            PromptTask(
                run_id=spec.run_id,
                prompt_id=f"src/{i}:ü",
                split="eval" if i % 3 == 2 else "train",
                input_ids=ids,
                loss_mask=mask,
                loss_mask_policy="given",
                run_spec_hash=spec.spec_hash(),
            )  # fmt: skip
        )
    return tasks


async def start_run(bus: Bus, spec: RunSpec, tasks: list[PromptTask], *, summary: bool) -> None:
    subjects = await bus.ensure_streams(spec.run_id)
    await bus.put_run_spec(spec)
    for task in tasks:
        await bus.publish(subjects.prompts, task, msg_id=f"prompt:{task.prompt_id}")
    if summary:
        await write_summary(bus, spec, tasks)


async def write_summary(bus: Bus, spec: RunSpec, tasks: list[PromptTask]) -> None:
    train = sum(t.split == "train" for t in tasks)
    record = EnqueueSummary(run_id=spec.run_id, sources=["test"], train=train,
                            eval=len(tasks) - train, skipped=0,
                            run_spec_hash=spec.spec_hash())  # fmt: skip
    assert await bus.put_record(enqueue_key(spec.run_id), record, create_only=True)


def new_worker(bus: Bus, spec: RunSpec, engine, **kw) -> CaptureWorker:
    kw = {"producer_id": "w0", "exit_when_done": True, "fetch_timeout_s": 0.2} | kw
    return CaptureWorker(bus, spec, engine, open_store(spec.store_uri), **kw)


async def samples_log(bus: Bus, run_id: str) -> tuple[list[SampleRef], list[EndOfSplit]]:
    refs, ends = [], []
    for split in ("train", "eval"):
        async for _, record in bus.replay(run_id, split):
            (refs if isinstance(record, SampleRef) else ends).append(record)
    return refs, ends


async def dead_letters(bus: Bus, run_id: str) -> dict[str, str]:
    """prompt id -> reason of every dead letter of the run."""
    stream = RunSubjects(run_id).stream("dlq")
    state = (await bus.js.stream_info(stream)).state
    out = {}
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        letter = decode((await bus.js.get_msg(stream, seq)).data, DeadLetter)
        out[decode(letter.payload, PromptTask).prompt_id] = letter.reason
    return out


def stored_files(spec: RunSpec) -> list[Path]:
    return sorted(Path(spec.store_uri.removeprefix("file://")).rglob("*.safetensors"))


async def until(condition, timeout: float = TIMEOUT, every: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(every)


async def assert_queue_drained(bus: Bus, run_id: str) -> None:
    lag = await bus.consumer_lag(run_id, "prompts", "capture")
    assert (lag.num_pending, lag.num_ack_pending) == (0, 0)
    assert await bus.stream_depth(run_id, "prompts") == 0  # work queue: acked prompts are gone


def check_samples(spec: RunSpec, engine, tasks: list[PromptTask], refs: list[SampleRef]) -> None:
    """Exactly one SampleRef per task, ids by the rule, tensors equal a single-row capture."""
    by_prompt = {r.prompt_id: r for r in refs}
    assert len(refs) == len(tasks) == len(by_prompt)
    store = open_store(spec.store_uri)
    for task in tasks:
        ref = by_prompt[task.prompt_id]
        assert ref.sample_id == expected_sample_id(spec.run_id, task.prompt_id, spec.spec_hash())
        assert ref.split == task.split and ref.run_spec_hash == spec.spec_hash()
        assert ref.num_tokens == len(task.input_ids)
        got = store.get(ref.features)
        assert set(got) == {"input_ids", "loss_mask", "aux_hidden_states", "hidden_states"}
        assert got["input_ids"].dtype == got["loss_mask"].dtype == torch.int64
        assert got["input_ids"].tolist() == task.input_ids
        assert got["loss_mask"].tolist() == task.loss_mask
        ids = torch.tensor([task.input_ids])
        want = engine.capture(ids, torch.ones_like(ids))
        for name in ("aux_hidden_states", "hidden_states"):
            assert got[name].shape == getattr(want, name)[0].shape
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], getattr(want, name)[0], atol=1e-5, rtol=1e-5)


# --- tests ----------------------------------------------------------------------------------


async def test_every_prompt_becomes_one_sample_with_the_target_features(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 11)
    await start_run(bus, spec, tasks, summary=True)
    worker = new_worker(bus, spec, engine)
    stats = await asyncio.wait_for(worker.run(), TIMEOUT)

    refs, ends = await samples_log(bus, run_id)
    check_samples(spec, engine, tasks, refs)
    assert {r.producer for r in refs} == {"w0"}
    assert len(stored_files(spec)) == len(tasks)
    await assert_queue_drained(bus, run_id)
    # One marker per split, after every sample of it, counting this worker's samples.
    assert sorted((e.split, e.samples_published) for e in ends) == [("eval", 3), ("train", 8)]
    assert stats.prompts_captured == 11 and stats.dead_lettered == 0 and stats.duplicates == 0
    shown = {f.label: (f.value, f.total) for f in stats.figures(prompts_total=11)}
    assert shown["prompts"] == (11, 11) and shown["dead-lettered"] == (None, None)
    # max_batch_tokens=96 with rows of up to 40 tokens: never more than 96 padded tokens.
    assert stats.forwards >= 4 and stats.padded_tokens <= stats.forwards * 96


async def test_two_workers_share_the_queue_without_duplicates_or_gaps(
    bus_config, run_id, target_dir, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=2)
    tasks = token_tasks(spec, 16, seed=1)
    buses = [await open_bus(bus_config) for _ in range(2)]
    try:
        await start_run(buses[0], spec, tasks, summary=True)
        # One engine per worker: capture hooks on a shared model are not thread-safe.
        workers = [
            new_worker(b, spec, HFTargetEngine.from_pretrained(target_dir), producer_id=f"w{i}")
            for i, b in enumerate(buses)
        ]
        stats = await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), TIMEOUT)
        refs, ends = await samples_log(buses[0], run_id)
        check_samples(spec, workers[0].engine, tasks, refs)
        assert sum(s.prompts_captured for s in stats) == 16
        assert sum(s.duplicates for s in stats) == 0
        assert len(ends) == 2 and len(stored_files(spec)) == 16
        await assert_queue_drained(buses[0], run_id)
    finally:
        for b in buses:
            await b.close()


async def test_prompts_fetched_but_never_acked_are_captured_once(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 6, seed=2)
    await start_run(bus, spec, tasks, summary=True)
    # A worker that fetched three prompts and died: they come back after ack_wait (1 s).
    raw = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="test",
                                  ack_wait_s=1.0)  # fmt: skip
    held = await raw.fetch(3, timeout=5)
    assert len(held) == 3
    await raw.close()
    stats = await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)
    refs, _ = await samples_log(bus, run_id)
    check_samples(spec, engine, tasks, refs)
    assert stats.prompts_captured == 6 and len(stored_files(spec)) == 6
    await assert_queue_drained(bus, run_id)


async def test_a_prompt_that_kills_every_worker_is_dead_lettered_and_leaves_the_queue(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    """A prompt whose every delivery dies unsettled (here max_deliver=1: one fetch, then the
    "worker" vanishes) is given up by JetStream; a running worker hears the advisory,
    dead-letters it with the reason and deletes it, so the queue drains and nothing else is
    lost."""
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 4, seed=4)
    await start_run(bus, spec, tasks, summary=True)
    raw = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="test",
                                  ack_wait_s=1.0, max_deliver=1)  # fmt: skip
    (poison,) = await raw.fetch(1, timeout=5)
    await raw.close()
    worker = new_worker(bus, spec, engine, exit_when_done=False)
    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: _has_letter(bus, run_id, poison.record.prompt_id))
        await until(lambda: _queue_empty(bus, run_id))
    finally:
        worker.stop()
        stats = await asyncio.wait_for(running, TIMEOUT)
    letters = await dead_letters(bus, run_id)
    assert list(letters) == [poison.record.prompt_id] and "never settled" in letters[
        poison.record.prompt_id]  # fmt: skip
    refs, _ = await samples_log(bus, run_id)
    check_samples(spec, engine, [t for t in tasks if t.prompt_id != poison.record.prompt_id], refs)
    assert stats.dead_lettered == 1
    await assert_queue_drained(bus, run_id)


async def test_a_prompt_given_up_while_no_worker_listened_is_dead_lettered_at_the_end(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    """The advisory came and went with no worker up (all had died on the prompt): the next
    worker finds it left in the drained queue and dead-letters it before ending the split."""
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 3, seed=5)
    await start_run(bus, spec, tasks, summary=True)
    raw = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="test",
                                  ack_wait_s=0.5, max_deliver=1)  # fmt: skip
    (poison,) = await raw.fetch(1, timeout=5)
    await raw.close()

    async def given_up() -> bool:  # delivered once, unsettled, never again: pending 0 / 0
        if not isinstance(bus, LocalBus):
            lag = await bus.consumer_lag(run_id, "prompts", "capture")
            return lag.num_ack_pending == 0
        return True

    await until(given_up)
    stats = await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)
    letters = await dead_letters(bus, run_id)
    assert list(letters) == [poison.record.prompt_id] and "never settled" in letters[
        poison.record.prompt_id]  # fmt: skip
    refs, ends = await samples_log(bus, run_id)
    check_samples(spec, engine, [t for t in tasks if t.prompt_id != poison.record.prompt_id], refs)
    assert stats.dead_lettered == 1 and len(ends) == 2
    await assert_queue_drained(bus, run_id)


async def _has_letter(bus, run_id: str, prompt_id: str) -> bool:
    return prompt_id in await dead_letters(bus, run_id)


async def _queue_empty(bus, run_id: str) -> bool:
    return await bus.stream_depth(run_id, "prompts") == 0


def crash_after_publish(worker: CaptureWorker) -> CaptureWorker:
    """The worker dies between the PubAck of its SampleRefs and the ack of its prompts."""

    async def stop_instead_of_acking(chunk) -> None:
        worker.stop()

    worker.emitter._ack = stop_instead_of_acking
    return worker


async def test_redelivery_after_a_crash_before_the_ack_publishes_no_second_sample(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=3)
    tasks = token_tasks(spec, 7, seed=3)
    await start_run(bus, spec, tasks, summary=True)
    crashed = crash_after_publish(
        new_worker(bus, spec, engine, ack_wait_s=1.0, producer_id="crashed")
    )
    first = await asyncio.wait_for(crashed.run(), TIMEOUT)
    crashed_with = first.prompts_captured  # published, never acked (a batch or two in flight)
    assert 3 <= crashed_with < 7

    stats = await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)
    # Recaptured after ack_wait; JetStream dropped the second SampleRef of each.
    assert stats.duplicates == crashed_with and stats.prompts_captured == 7
    refs, ends = await samples_log(bus, run_id)
    check_samples(spec, engine, tasks, refs)  # still exactly one SampleRef per prompt
    assert sum(r.producer == "crashed" for r in refs) == crashed_with
    assert len(stored_files(spec)) == 7  # the store kept one file per sample
    assert sum(e.samples_published for e in ends) == 7 - crashed_with  # its own samples
    await assert_queue_drained(bus, run_id)


async def test_bad_tasks_are_dead_lettered_with_reasons_and_the_rest_flows(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    good = token_tasks(spec, 5, seed=4)
    base = dict(run_id=run_id, split="train", loss_mask_policy="given",
                run_spec_hash=spec.spec_hash())  # fmt: skip
    bad = [
        PromptTask(
            **base | {"run_spec_hash": "0123456789abcdef"},
            prompt_id="stale",
            input_ids=[5, 6, 7],
            loss_mask=[0, 1, 1],
        ),  # fmt: skip
        PromptTask(**base, prompt_id="nothing-to-learn", input_ids=[5, 6, 7], loss_mask=[0, 0, 0]),
        PromptTask(**base, prompt_id="foreign-ids", input_ids=[5, 99999], loss_mask=[0, 1]),
        PromptTask(**base, prompt_id="conversation", messages=[Message("user", "hi")]),
    ]
    tasks = good[:2] + bad + good[2:]
    await start_run(bus, spec, tasks, summary=True)
    stats = await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)

    refs, ends = await samples_log(bus, run_id)
    check_samples(spec, engine, good, refs)
    reasons = await dead_letters(bus, run_id)
    assert set(reasons) == {t.prompt_id for t in bad}
    assert "0123456789abcdef" in reasons["stale"] and spec.spec_hash() in reasons["stale"]
    assert "0 supervised" in reasons["nothing-to-learn"]
    assert "min_loss_tokens=1" in reasons["nothing-to-learn"]
    assert "outside the target vocabulary" in reasons["foreign-ids"]
    assert "prefill" in reasons["conversation"] and "messages" in reasons["conversation"]
    assert stats.dead_lettered == 4 and stats.prompts_captured == 5 and len(ends) == 2
    await assert_queue_drained(bus, run_id)


async def test_end_of_split_waits_for_the_enqueue_summary(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 5, seed=5)
    await start_run(bus, spec, tasks, summary=False)
    worker = new_worker(bus, spec, engine, exit_when_done=False)
    running = asyncio.create_task(worker.run())

    async def drained_and_idle() -> bool:
        return worker.stats.prompts_captured == 5 and worker.stats.empty_fetches >= 3

    await until(drained_and_idle)
    refs, ends = await samples_log(bus, run_id)
    assert len(refs) == 5 and ends == []  # queue empty, but enqueue has not finished
    assert not running.done()

    await write_summary(bus, spec, tasks)

    async def ended() -> bool:
        return worker.stats.end_published

    await until(ended)
    idle = worker.stats.empty_fetches

    async def polled_again() -> bool:
        return worker.stats.empty_fetches >= idle + 3

    await until(polled_again)
    _, ends = await samples_log(bus, run_id)
    assert sorted(e.split for e in ends) == ["eval", "train"]  # once, though it kept polling
    assert not running.done()
    worker.stop()
    await asyncio.wait_for(running, TIMEOUT)


class FlakyEngine:
    """The real engine, but the first capture call fails and any batch holding the poison token
    fails every time."""

    POISON = 511

    def __init__(self, engine) -> None:
        self._engine = engine
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def capture(self, input_ids, attention_mask):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("transient: device busy")
        if (input_ids == self.POISON).any():
            raise RuntimeError("poison sample")
        return self._engine.capture(input_ids, attention_mask)


async def test_failures_are_retried_and_a_poison_sample_is_dead_lettered_alone(
    bus_config, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 6, seed=6)
    poison = msgspec.structs.replace(
        tasks[0], prompt_id="poison", input_ids=[FlakyEngine.POISON, 7, 8], loss_mask=[0, 1, 1]
    )
    async with await open_bus(msgspec.structs.replace(bus_config, max_deliver=2)) as bus:
        await start_run(bus, spec, [poison, *tasks], summary=True)
        flaky = FlakyEngine(engine)
        worker = new_worker(bus, spec, flaky, backoff_s=(0.05, 0.1))
        stats = await asyncio.wait_for(worker.run(), TIMEOUT)
        refs, ends = await samples_log(bus, run_id)
        check_samples(spec, engine, tasks, refs)
        reasons = await dead_letters(bus, run_id)
        assert list(reasons) == ["poison"]
        assert (
            "delivery 2 of max_deliver=2" in reasons["poison"]
            and "poison sample" in reasons["poison"]
        )
        assert stats.retried == 1 and stats.dead_lettered == 1 and len(ends) == 2
        await assert_queue_drained(bus, run_id)


class StopDuringForward:
    """The real engine; asks the worker to stop while its first forward runs (like SIGTERM)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.worker = None
        self.loop = None

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def capture(self, input_ids, attention_mask):
        self.loop.call_soon_threadsafe(self.worker.stop)
        return self._engine.capture(input_ids, attention_mask)


async def test_stop_finishes_and_acks_the_current_batch(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=3, max_batch_tokens=4096)
    tasks = token_tasks(spec, 9, seed=7)
    await start_run(bus, spec, tasks, summary=True)
    wrapped = StopDuringForward(engine)
    worker = new_worker(bus, spec, wrapped)
    wrapped.worker, wrapped.loop = worker, asyncio.get_running_loop()
    stats = await asyncio.wait_for(worker.run(), TIMEOUT)
    assert stats.prompts_captured == 3 and not stats.end_published
    refs, ends = await samples_log(bus, run_id)
    assert len(refs) == 3 and ends == []
    lag = await bus.consumer_lag(run_id, "prompts", "capture")
    assert (lag.num_pending, lag.num_ack_pending) == (6, 0)  # the rest untouched, none held


class SlowEngine:
    """The real engine; each forward takes a few ack waits and says when it started."""

    def __init__(self, engine, seconds: float) -> None:
        self._engine = engine
        self.seconds = seconds
        self.started = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def capture(self, input_ids, attention_mask):
        self.started.set()
        time.sleep(self.seconds)
        return self._engine.capture(input_ids, attention_mask)


async def test_prompts_held_through_a_slow_forward_are_not_redelivered(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    """A forward three ack waits long: the heartbeat keeps its prompts from coming back, so a
    second consumer of the queue gets none of them meanwhile."""
    spec = make_spec(run_id, target_dir, tmp_path, batch_size=4, max_batch_tokens=4096)
    tasks = token_tasks(spec, 3, seed=8)
    await start_run(bus, spec, tasks, summary=True)
    slow = SlowEngine(engine, seconds=3.0)
    worker = new_worker(bus, spec, slow, ack_wait_s=1.0)
    running = asyncio.create_task(worker.run())
    try:
        assert await asyncio.to_thread(slow.started.wait, TIMEOUT)
        probe = await bus.work_consumer(run_id, "prompts", "capture", PromptTask,
                                        service="test", ack_wait_s=1.0)  # fmt: skip
        try:
            assert await probe.fetch(3, timeout=2.5) == []  # past two ack waits
        finally:
            await probe.close()
    finally:
        stats = await asyncio.wait_for(running, TIMEOUT)  # exits once done
    assert stats.prompts_captured == 3 and stats.duplicates == 0 and stats.forwards == 1
    refs, _ = await samples_log(bus, run_id)
    check_samples(spec, engine, tasks, refs)
    await assert_queue_drained(bus, run_id)


# --- decode mode ------------------------------------------------------------------------------

CONVERSATIONS = [
    [Message("user", "What is the capital of France?"), Message("assistant", "Paris.")],
    [
        Message("system", "Be brief."),
        Message("user", "Write a poem about autumn leaves."),
        Message("assistant", "Golden leaves drift."),
        Message("user", "More?"),
        Message("assistant", "Amber and brown."),
    ],  # fmt: skip
    [Message("user", "def fibonacci(n):")],
    [Message("user", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024")],
    [Message("user", "Summarize the following article in three sentences.")],
]


def decode_tasks(spec: RunSpec) -> list[PromptTask]:
    return [
        PromptTask(
            run_id=spec.run_id,
            prompt_id=f"c{i}",
            split="train",
            messages=messages,
            run_spec_hash=spec.spec_hash(),
        )  # fmt: skip
        for i, messages in enumerate(CONVERSATIONS)
    ]


async def test_decode_mode_captures_the_targets_own_greedy_reply(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    from specforge_common.data.chat import generation_prompt_ids

    spec = make_spec(run_id, target_dir, tmp_path, mode="decode", max_new_tokens=12)
    tasks = decode_tasks(spec)
    no_prompt = PromptTask(run_id=run_id, prompt_id="reply-only", split="train",
                           messages=[Message("assistant", "hello")],
                           run_spec_hash=spec.spec_hash())  # fmt: skip
    await start_run(bus, spec, [*tasks, no_prompt], summary=True)
    stats = await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)

    refs, _ = await samples_log(bus, run_id)
    by_prompt = {r.prompt_id: r for r in refs}
    assert set(by_prompt) == {t.prompt_id for t in tasks}
    store = open_store(spec.store_uri)
    tokenizer = engine.tokenizer
    for task in tasks:
        prompt = generation_prompt_ids(tokenizer, task.messages)
        ids = torch.tensor([prompt])
        reply = engine.generate(ids, torch.ones_like(ids), max_new_tokens=12)[0]
        assert 0 < len(reply) <= 12
        got = store.get(by_prompt[task.prompt_id].features)
        assert got["input_ids"].tolist() == prompt + reply
        assert got["loss_mask"].tolist() == [0] * len(prompt) + [1] * len(reply)
        want = engine.capture(got["input_ids"][None], torch.ones_like(got["input_ids"][None]))
        torch.testing.assert_close(got["hidden_states"], want.hidden_states[0], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
    assert stats.generated_tokens == sum(r.num_tokens for r in refs) - sum(
        len(generation_prompt_ids(tokenizer, t.messages)) for t in tasks
    )
    reasons = await dead_letters(bus, run_id)
    assert list(reasons) == ["reply-only"] and "no message before" in reasons["reply-only"]


async def test_decode_mode_sampling_is_seeded_by_run_seed_and_prompt_id(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    from specforge_common.data.chat import generation_prompt_ids

    spec = make_spec(run_id, target_dir, tmp_path, mode="decode", max_new_tokens=10,
                     temperature=1.0)  # fmt: skip
    tasks = decode_tasks(spec)[:3]
    await start_run(bus, spec, tasks, summary=True)
    await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)
    refs, _ = await samples_log(bus, run_id)
    store = open_store(spec.store_uri)
    for ref in refs:
        task = next(t for t in tasks if t.prompt_id == ref.prompt_id)
        prompt = generation_prompt_ids(engine.tokenizer, task.messages)
        ids = torch.tensor([prompt])
        reply = engine.generate(ids, torch.ones_like(ids), max_new_tokens=10, temperature=1.0,
                                seed=decode_seed(spec.seed, task.prompt_id))[0]  # fmt: skip
        assert store.get(ref.features)["input_ids"].tolist() == prompt + reply
