"""The evaluator on a live run with unreadable messages on every subject it reads (the eval
split, the checkpoint events): each is dead-lettered with its subject, sequence and reason, the
final checkpoint is still evaluated, and a restarted evaluator is not stopped by them either."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from specforge_common.contracts import CheckpointEvent, EvalResult, EvalSpec, RunSpec, SampleRef
from specforge_common.featurestore import open_store
from specforge_common.targets import make_tiny_target
from specforge_evaluator.service import Evaluator
from tests.evaluator import build_draft, publish_checkpoint, read_stream, vocab_map_of_run
from tests.support import seed_captured_run, tiny_run_spec
from tests.unreadable import GARBAGE, assert_dead_lettered, dead_letters, garbage, publish_raw

FAST_EVAL = EvalSpec(max_samples=8, batch_size=4, serving_prompts=0)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


def evaluator(bus, spec: RunSpec) -> Evaluator:
    return Evaluator(bus, spec, open_store(spec.store_uri), fetch_timeout=0.2,
                     exit_when_final=True)  # fmt: skip


def like_ref(spec: RunSpec) -> SampleRef:
    from specforge_common.contracts import FeatureLocation

    return SampleRef(sample_id="x", run_id=spec.run_id, prompt_id="x", split="eval", producer="x",
                     features=FeatureLocation(uri="x", tensors=[], nbytes=0, checksum="0"),
                     num_tokens=1, run_spec_hash=spec.spec_hash())  # fmt: skip


def like_event(spec: RunSpec) -> CheckpointEvent:
    return CheckpointEvent(run_id=spec.run_id, step=99, samples_consumed=0, last_sequence={},
                           checkpoint_uri="/x", checkpoint_sha256="0" * 64,
                           run_spec_hash=spec.spec_hash())  # fmt: skip


async def test_the_evaluator_dead_letters_what_it_cannot_read_and_evaluates_the_run(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path, eval=FAST_EVAL)
    subjects = await bus.ensure_streams(run_id)
    rows = []  # (subject, sequence, payload) of each unreadable message
    for kind in GARBAGE:
        for subject, like in ((subjects.samples("eval"), like_ref(spec)),
                              (subjects.checkpoints, like_event(spec))):  # fmt: skip
            data = garbage(kind, like)
            rows.append((subject, await publish_raw(bus, subject, data), data))
    await seed_captured_run(bus, spec, n_train=2, n_eval=3)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 4, final=True)

    report = await asyncio.wait_for(evaluator(bus, spec).run(), timeout=60)
    assert report.evaluated == [4] and report.final_evaluated
    (result,) = await read_stream(bus, run_id, "evals", EvalResult)
    assert result.metrics["eval/samples"] == 3

    # Newer unreadable events after the final one: a restarted evaluator reads past them all.
    for kind in GARBAGE:
        data = garbage(kind, like_event(spec))
        seq = await publish_raw(bus, subjects.checkpoints, data)
        rows.append((subjects.checkpoints, seq, data))
    again = await asyncio.wait_for(evaluator(bus, spec).run(), timeout=60)
    assert again.evaluated == [] and again.final_step is None  # nothing left to do
    assert_dead_lettered(await dead_letters(bus, run_id), rows)


async def test_garbage_on_the_eval_split_stops_neither_the_evaluator_nor_its_restart(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    """Regression: an undecodable message on ``sf.<run>.samples.eval`` killed the evaluator,
    and every restart (the message stays in the log)."""
    spec = tiny_run_spec(run_id, target_dir, tmp_path, eval=FAST_EVAL)
    subjects = await bus.ensure_streams(run_id)
    data = b"\xc1 not a record"
    seq = await publish_raw(bus, subjects.samples("eval"), data)
    await seed_captured_run(bus, spec, n_train=2, n_eval=2)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 2)

    first = evaluator(bus, spec)
    task = asyncio.create_task(first.run())
    await asyncio.sleep(0)
    for _ in range(200):  # until it evaluated step 2, then stop it as SIGTERM would
        if first.report.evaluated:
            break
        await asyncio.sleep(0.1)
    first.stop()
    assert (await asyncio.wait_for(task, 60)).evaluated == [2]
    await publish_checkpoint(bus, spec, draft, 4, final=True)
    restarted = await asyncio.wait_for(evaluator(bus, spec).run(), timeout=60)
    assert restarted.evaluated == [4] and restarted.final_evaluated
    assert_dead_lettered(await dead_letters(bus, run_id), [(subjects.samples("eval"), seq, data)])
