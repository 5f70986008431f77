"""The trainer's side of re-capture: a sample whose features vanished from the store is captured
again from its prompt and trained at its place; when it cannot be, it is dead-lettered as before.

Real nats-server (and ``LocalBus`` where cheap), real file store, the tiny target and the real
``CaptureWorker``. With one row per capture forward the re-captured features are bit-identical
to the first capture's on CPU, so a run that lost a sample ends with exactly the weights of a run
that did not.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus, BusConfig, LocalBus, open_bus
from specforge_common.contracts import (
    CaptureSpec,
    DeadLetter,
    EndOfSplit,
    PromptTask,
    SampleRef,
    decode,
)
from specforge_common.data.enqueue import enqueue, publish_prompts
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.featurestore import open_store
from specforge_common.log import get_logger
from specforge_common.step_log import read_step_log, trained_samples_path
from specforge_common.subjects import RunSubjects
from specforge_common.targets import HFTargetEngine, make_tiny_target
from specforge_trainer.data import SampleStream
from specforge_trainer.loop import Trainer
from specforge_trainer.recapture import RecaptureError, Recapturer
from tests.capture.test_worker import new_worker, token_tasks, write_summary
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import train_spec

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


@pytest.fixture(scope="module")
def engine(target: Path) -> HFTargetEngine:
    return HFTargetEngine.from_pretrained(target)


@pytest.fixture(params=["nats", "local"])
async def any_bus(request: pytest.FixtureRequest, bus_config: BusConfig):
    if request.param == "local":
        yield LocalBus(bus_config)
        return
    async with await open_bus(bus_config) as connection:
        yield connection


# --- helpers --------------------------------------------------------------------------------


async def collect(stream: SampleStream) -> list:
    async with stream:
        return [s async for s in stream]


def open_stream(bus, spec, **kw) -> SampleStream:
    return SampleStream(bus, open_store(spec.store_uri), spec.run_id, spec_hash=spec.spec_hash(),
                        **kw)  # fmt: skip


async def dead_letters(bus, run_id: str) -> list[DeadLetter]:
    return [r async for _, r in bus.records(run_id, "dlq", DeadLetter)]


async def recapture_requests(bus, run_id: str) -> list[PromptTask]:
    """Re-capture requests still in the prompts work queue (JetStream refuses to replay a work
    queue with an ordered consumer: read it message by message)."""
    subjects = RunSubjects(run_id)
    if isinstance(bus, LocalBus):
        return [task async for _, task in bus.read_log(
            subjects.stream("prompts"), subjects.recapture_prompts, PromptTask)]  # fmt: skip
    stream = subjects.stream("prompts")
    state = (await bus.js.stream_info(stream)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        msg = await bus.js.get_msg(stream, seq)
        if msg.subject == subjects.recapture_prompts:
            out.append(decode(msg.data, PromptTask))
    return out


async def recaptured_refs(bus, run_id: str) -> list[SampleRef]:
    subjects = RunSubjects(run_id)
    return [ref async for _, ref in bus.read_log(
        subjects.stream("samples"), subjects.recaptured, SampleRef)]  # fmt: skip


def task_of(ref: SampleRef, tensors: dict[str, torch.Tensor], spec_hash: str) -> PromptTask:
    """The PromptTask that captures exactly ``tensors``' tokens (for the prompt log)."""
    return PromptTask(run_id=ref.run_id, prompt_id=ref.prompt_id, split=ref.split,
                      input_ids=tensors["input_ids"].tolist(),
                      loss_mask=tensors["loss_mask"].tolist(), loss_mask_policy="given",
                      run_spec_hash=spec_hash)  # fmt: skip


def nudged(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same sample with other feature bits, as a GPU re-capture may produce."""
    return tensors | {"hidden_states": tensors["hidden_states"] + 1e-3}


# --- the stream on its own --------------------------------------------------------------------


async def test_a_sample_that_cannot_be_recaptured_is_dead_lettered(
    any_bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    bus = any_bus
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = (await seed_captured_run(bus, spec, n_train=4, n_eval=1))["train"]
    subjects = RunSubjects(run_id)
    store = open_store(spec.store_uri)
    waited = refs[1]  # its prompt is logged, but no capture worker answers
    task = task_of(waited, store.get(waited.features), spec.spec_hash())
    await bus.publish(subjects.prompt_log(waited.prompt_id), task, "log:1")
    store.delete(waited.features)
    store.delete(refs[2].features)  # its prompt was never logged

    stream = open_stream(bus, spec, recapture_timeout_s=0.3)
    got = await collect(stream)

    assert [s.ref.sample_id for s in got] == [refs[0].sample_id, refs[3].sample_id]
    assert (stream.stats.dead_lettered, stream.stats.recaptured) == (2, 0)
    letters = await dead_letters(bus, run_id)
    assert [msgspec.msgpack.decode(x.payload)["sample_id"] for x in letters] == [
        refs[1].sample_id, refs[2].sample_id]  # fmt: skip
    assert all(x.reason.startswith("FeatureMissingError") for x in letters)
    assert "not re-captured" in letters[0].reason and "within 0.3s" in letters[0].reason
    assert f"prompt {refs[2].prompt_id!r} is not in the prompt log" in letters[1].reason
    # The one logged prompt was asked for again, once, on the re-capture subject.
    assert await recapture_requests(bus, run_id) == [
        msgspec.structs.replace(task, recapture=True, attempt=1)]  # fmt: skip


async def test_the_recaptured_log_is_read_before_asking_again(
    any_bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """What a replayed or resumed stream meets: features missing or rewritten by an earlier
    re-capture. Corrupt features that were never re-captured are still dead-lettered."""
    bus = any_bus
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = (await seed_captured_run(bus, spec, n_train=5, n_eval=1))["train"]
    subjects = RunSubjects(run_id)
    store = open_store(spec.store_uri)
    first = {r.sample_id: store.get(r.features) for r in refs}

    async def rewrite(ref: SampleRef, *, announce: bool) -> SampleRef:
        """Delete and store again with other bytes (same key), as a re-capture does."""
        store.delete(ref.features)
        location = store.put(ref.sample_id, nudged(first[ref.sample_id]))
        again = msgspec.structs.replace(ref, producer="again", features=location)
        if announce:
            await bus.publish(subjects.recaptured, again, f"recaptured:{ref.sample_id}:1")
        return again

    rewritten = await rewrite(refs[1], announce=True)  # original ref: checksum mismatch
    await rewrite(refs[2], announce=False)  # corrupt, never re-captured
    gone = await rewrite(refs[3], announce=True)
    store.delete(gone.features)  # re-captured once, then evicted again
    task = task_of(refs[3], first[refs[3].sample_id], spec.spec_hash())
    await bus.publish(subjects.prompt_log(refs[3].prompt_id), task, "log:3")

    stream = open_stream(bus, spec, recapture_timeout_s=0.3)
    got = await collect(stream)

    assert [s.ref.sample_id for s in got] == [refs[0].sample_id, refs[1].sample_id,
                                              refs[4].sample_id]  # fmt: skip
    assert got[1].ref == rewritten and got[1].seq == (await seq_of(bus, run_id, refs[1]))
    want = nudged(first[refs[1].sample_id])
    assert all(torch.equal(got[1].tensors[k], want[k]) for k in want)
    assert (stream.stats.recaptured, stream.stats.dead_lettered) == (1, 2)
    letters = await dead_letters(bus, run_id)
    assert letters[0].reason.startswith("FeatureCorruptError")
    assert letters[1].reason.startswith("FeatureMissingError")
    assert "within 0.3s" in letters[1].reason
    # Only the evicted-again sample was asked for, as its second re-capture.
    assert await recapture_requests(bus, run_id) == [
        msgspec.structs.replace(task, recapture=True, attempt=2)]  # fmt: skip


async def test_after_an_unanswered_request_nobody_is_asked_until_capture_answers(
    any_bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """A store that lost everything with no capture worker around costs one wait, not one per
    sample; an answer (capture is back) ends the quiet period."""
    bus = any_bus
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = (await seed_captured_run(bus, spec, n_train=2, n_eval=1))["train"]
    subjects = RunSubjects(run_id)
    store = open_store(spec.store_uri)
    tasks = [task_of(r, store.get(r.features), spec.spec_hash()) for r in refs]
    for i, task in enumerate(tasks):
        await bus.publish(subjects.prompt_log(task.prompt_id), task, f"log:{i}")
    recapturer = Recapturer(bus, run_id, timeout_s=0.2, log=get_logger())

    assert await recapturer.known(refs[0].sample_id) == []
    with pytest.raises(RecaptureError, match="within 0.2s"):
        await recapturer.request(refs[0], 1)
    with pytest.raises(RecaptureError, match="went unanswered"):
        await recapturer.request(refs[1], 1)  # at once, without asking
    assert [t.prompt_id for t in await recapture_requests(bus, run_id)] == [refs[0].prompt_id]

    answer = msgspec.structs.replace(refs[0], producer="late")  # capture came back
    await bus.publish(subjects.recaptured, answer, f"recaptured:{refs[0].sample_id}:1")
    assert await recapturer.known(refs[0].sample_id) == [answer]
    with pytest.raises(RecaptureError, match="within 0.2s"):
        await recapturer.request(refs[1], 1)  # asked again
    assert [t.prompt_id for t in await recapture_requests(bus, run_id)] == [
        refs[0].prompt_id, refs[1].prompt_id]  # fmt: skip


async def seq_of(bus, run_id: str, ref: SampleRef) -> int:
    async for seq, record in bus.replay(run_id, "train"):
        if isinstance(record, SampleRef) and record.sample_id == ref.sample_id:
            return seq
    raise AssertionError(f"{ref.sample_id} is not in the train log")


async def test_a_capture_worker_recaptures_a_lost_sample_in_place(
    any_bus, run_id: str, target: Path, engine, tmp_path: Path
) -> None:
    bus = any_bus
    spec = tiny_run_spec(run_id, target, tmp_path, capture=CaptureSpec(batch_size=1))
    tasks = token_tasks(spec, 6, seed=5)
    await bus.ensure_streams(run_id)
    await bus.put_run_spec(spec)
    await publish_prompts(bus, tasks)
    await write_summary(bus, spec, tasks)
    await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)
    log = [(seq, r) async for seq, r in bus.replay(run_id, "train")
           if isinstance(r, SampleRef)]  # fmt: skip
    store = open_store(spec.store_uri)
    lost = log[1][1]
    original = store.get(lost.features)
    store.delete(lost.features)

    worker = new_worker(bus, spec, engine, producer_id="w1", exit_when_done=False)
    running = asyncio.create_task(worker.run())
    stream = open_stream(bus, spec, recapture_timeout_s=TIMEOUT)
    got = await asyncio.wait_for(collect(stream), TIMEOUT)
    worker.stop()
    stats = await asyncio.wait_for(running, TIMEOUT)

    assert [(s.seq, s.ref.sample_id) for s in got] == [(q, r.sample_id) for q, r in log]
    assert got[1].ref.producer == "w1" and got[1].ref == (await recaptured_refs(bus, run_id))[0]
    assert all(torch.equal(got[1].tensors[k], original[k]) for k in original)
    assert (stream.stats.recaptured, stream.stats.dead_lettered) == (1, 0)
    assert stats.recaptured == 1 and stats.samples_published == {"train": 0, "eval": 0}
    assert await dead_letters(bus, run_id) == []


# --- the whole pipeline -----------------------------------------------------------------------

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def write_dataset(path: Path, n: int) -> Path:
    with path.open("w") as out:
        for i in range(n):
            words = [WORDS[(i * 3 + j) % len(WORDS)] for j in range(4 + i % 3)]
            out.write(json.dumps({"id": f"conv-{i}", "conversations": [
                {"role": "user", "content": "repeat: " + " ".join(words)},
                {"role": "assistant", "content": " ".join(words)},
            ]}) + "\n")  # fmt: skip
    return path


async def test_a_run_that_lost_a_sample_trains_the_same_weights_as_one_that_did_not(
    bus: Bus, run_id: str, target: Path, engine, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, capture=CaptureSpec(batch_size=1),
                         train=train_spec(epochs=2, checkpoint_every=100),
                         eval_fraction=0.1)  # fmt: skip
    await bus.put_run_spec(spec)
    report = await enqueue(bus, spec, write_dataset(tmp_path / "chats.jsonl", 9))
    assert report.train >= 6
    await asyncio.wait_for(new_worker(bus, spec, engine).run(), TIMEOUT)

    # The reference: a replay of the run's samples before anything was lost.
    reference = msgspec.structs.replace(spec, run_id=f"{run_id}-ref", data_run=run_id)
    await bus.ensure_streams(reference.run_id)
    await bus.put_run_spec(reference)
    expected = await asyncio.wait_for(Trainer(bus, reference.run_id).run(), TIMEOUT)

    train = [r async for _, r in bus.replay(run_id, "train") if not isinstance(r, EndOfSplit)]
    lost = train[2]
    store = open_store(spec.store_uri)
    original = store.get(lost.features)
    store.delete(lost.features)  # evicted before the run's own trainer reads it

    worker = new_worker(bus, spec, engine, producer_id="w1", exit_when_done=False)
    capturing = asyncio.create_task(worker.run())
    result = await asyncio.wait_for(Trainer(bus, run_id).run(), 2 * TIMEOUT)
    worker.stop()
    await asyncio.wait_for(capturing, TIMEOUT)

    assert result.step == expected.step > 0
    assert result.stream["recaptured"] == 1 and result.stream["dead_lettered"] == 0
    assert await dead_letters(bus, run_id) == []
    [again] = await recaptured_refs(bus, run_id)
    assert again.sample_id == lost.sample_id and again.producer == "w1"
    assert all(torch.equal(store.get(again.features)[k], original[k]) for k in original)
    ours = read_step_log(trained_samples_path(spec.output_dir, run_id))
    theirs = read_step_log(trained_samples_path(spec.output_dir, reference.run_id))
    assert [e["samples"] for e in ours] == [e["samples"] for e in theirs]
    assert sum(lost.sample_id in e["samples"] for e in ours) == 2  # once per epoch, in place
    a = load_file(result.final.path / WEIGHTS_NAME)
    b = load_file(expected.final.path / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
