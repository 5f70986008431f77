"""The trainer on a live run with unreadable messages on every subject it reads (the train split,
re-captured samples, the prompt log, checkpoint events, eval results): each is dead-lettered with
its subject, sequence and reason, and training still ends with a final checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from specforge_common.contracts import CheckpointEvent, EvalResult, PromptTask, RunSpec
from specforge_common.featurestore import open_store
from specforge_common.subjects import RunSubjects
from specforge_common.targets import make_tiny_target
from specforge_trainer.loop import Trainer
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import train_spec
from tests.unreadable import GARBAGE, assert_dead_lettered, dead_letters, garbage, publish_raw


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def like_event(spec: RunSpec) -> CheckpointEvent:
    return CheckpointEvent(run_id=spec.run_id, step=99, samples_consumed=0, last_sequence={},
                           checkpoint_uri="/x", checkpoint_sha256="0" * 64,
                           run_spec_hash=spec.spec_hash())  # fmt: skip


def like_eval(spec: RunSpec) -> EvalResult:
    return EvalResult(run_id=spec.run_id, step=99, checkpoint_sha256="0" * 64, acceptance_rates=[],
                      run_spec_hash=spec.spec_hash())  # fmt: skip


async def test_the_trainer_dead_letters_what_it_cannot_read_and_finishes(
    bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=2))
    subjects = await bus.ensure_streams(run_id)
    rows = []  # (subject, sequence, payload) of each unreadable message

    async def publish(subject: str, data: bytes) -> None:
        rows.append((subject, await publish_raw(bus, subject, data), data))

    for kind in GARBAGE:  # before the samples: the train split starts with them
        await publish(subjects.samples("train"), garbage(kind, like_event(spec)))
    refs = await seed_captured_run(bus, spec, n_train=8, n_eval=1)
    # Three samples lose their features: the trainer looks for re-captured copies (in a log
    # full of garbage) and for their prompts (each an unreadable prompt-log entry).
    store = open_store(spec.store_uri)
    for kind, ref in zip(GARBAGE, refs["train"][:3], strict=True):
        store.delete(ref.features)
        task = PromptTask(run_id=run_id, prompt_id=ref.prompt_id, split="train", input_ids=[1])
        await publish(subjects.prompt_log(ref.prompt_id), garbage(kind, task))
    for kind in GARBAGE:
        await publish(subjects.recaptured, garbage(kind, refs["train"][0]))
        await publish(subjects.evals, garbage(kind, like_eval(spec)))
        await publish(subjects.checkpoints, garbage(kind, like_event(spec)))

    result = await asyncio.wait_for(Trainer(bus, run_id).run(), timeout=120)
    assert result.final is not None and result.samples_consumed == 5
    assert result.stream["dead_lettered"] == 3  # the samples without features
    # A restart finds the final checkpoint and its event among the unreadable ones.
    again = await asyncio.wait_for(Trainer(bus, run_id, resume=True).run(), timeout=60)
    assert again.already_finished and again.step == result.step
    assert_dead_lettered(await dead_letters(bus, run_id), rows)


async def test_garbage_on_the_evals_stream_does_not_stop_training_nor_a_restart(
    bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """Regression: at every checkpoint the trainer read the evals stream, raised on an
    undecodable message and exited 1; every restart did the same."""
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=1))
    await seed_captured_run(bus, spec, n_train=4, n_eval=1)
    evals = RunSubjects(run_id).evals
    data = b"\xc1 not a record"
    seq = await publish_raw(bus, evals, data)

    trainer = Trainer(bus, run_id)
    task = asyncio.create_task(trainer.run())
    for _ in range(600):  # stop it after its first checkpoint, as SIGTERM would
        if await bus.stream_depth(run_id, "checkpoints"):
            break
        await asyncio.sleep(0.05)
    trainer.request_stop()
    first = await asyncio.wait_for(task, timeout=60)
    assert first.checkpoints
    resumed = await asyncio.wait_for(Trainer(bus, run_id, resume=True).run(), timeout=60)
    assert resumed.final is not None and resumed.samples_consumed == 4
    assert_dead_lettered(await dead_letters(bus, run_id), [(evals, seq, data)])
