"""Consume-once (``train.consume_features``): a train sample's features leave the store once a
checkpoint covers the step that used them -- never earlier, so a resume after a crash still
finds every sample after the checkpoint. On file:// and on a real Mooncake master + holder."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from specforge_common.bus import Bus
from specforge_common.contracts import EndOfSplit, EnqueueSummary, TrainerProgress
from specforge_common.featurestore import open_store
from specforge_common.step_log import trained_samples_path
from specforge_common.subjects import RunSubjects, enqueue_key, progress_key
from specforge_common.targets import make_tiny_target
from specforge_trainer.loop import Trainer, TrainerError
from tests.mooncake_support import mooncake_master, mooncake_uri  # noqa: F401 - fixture
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import drop_end_markers, train_spec

CONSUME = train_spec(consume_features=True, checkpoint_every=2, keep_last=100)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


@pytest.fixture(params=["file", "mooncake"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'features'}"
    return mooncake_uri(request.getfixturevalue("mooncake_master"))


def trained_log(spec) -> list[dict]:
    path = trained_samples_path(spec.output_dir, spec.run_id)
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_consume_once_run_leaves_no_train_sample_in_the_store(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, store_uri: str
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=CONSUME, store_uri=store_uri)
    store = open_store(store_uri)
    used = getattr(store, "used_bytes", lambda: None)
    before = used()
    refs = await seed_captured_run(bus, spec, n_train=7, n_eval=2, seed=3)
    summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    seeded = used()

    result = await Trainer(bus, run_id).run()

    assert result.step == 4 and result.samples_consumed == 7 and not result.stopped
    assert [c.step for c in result.checkpoints] == [0, 2, 4]
    trained = {s for entry in trained_log(spec) for s in entry["samples"]}
    assert trained == {r.sample_id for r in refs["train"]}
    assert not any(store.exists(r.features) for r in refs["train"])
    assert all(store.exists(r.features) for r in refs["eval"])  # the evaluator's
    assert store.exists(summary.vocab_map)
    if before is not None:  # mooncake: the master's byte count drops by exactly the train bytes
        total = sum(r.features.nbytes for split in refs.values() for r in split)
        assert seeded - before == total + summary.vocab_map.nbytes
        assert seeded - used() == sum(r.features.nbytes for r in refs["train"])
    store.close()


async def test_a_crash_keeps_the_samples_after_the_last_checkpoint_and_a_resume_consumes_them(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, store_uri: str
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=CONSUME, store_uri=store_uri)
    refs = await seed_captured_run(bus, spec, n_train=8, n_eval=1, seed=5)
    await drop_end_markers(bus, run_id)  # capture "still running": the trainer waits for more
    by_id = {r.sample_id: r for r in refs["train"]}
    store = open_store(store_uri)

    trainer = Trainer(bus, run_id)
    running = asyncio.create_task(trainer.run())
    for _ in range(400):  # the last batch waits for its look-ahead: 3 steps are trained
        progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
        if progress is not None and progress.step == 3:
            break
        await asyncio.sleep(0.05)
    assert progress is not None and progress.step == 3 and not running.done()
    running.cancel()  # a crash: no stop checkpoint, step 3 is not covered
    with pytest.raises(asyncio.CancelledError):
        await running

    steps = {e["step"]: e["samples"] for e in trained_log(spec)}
    assert sorted(steps) == [1, 2, 3]
    covered = steps[1] + steps[2]  # by the step-2 checkpoint: deleted
    assert not any(store.exists(by_id[s].features) for s in covered)
    rest = [s for s in by_id if s not in covered]  # step 3's samples were trained, not covered
    assert len(rest) == 4 and all(store.exists(by_id[s].features) for s in rest)

    subjects = RunSubjects(run_id)  # capture "finishes": the end markers come back
    for split, n in (("train", 8), ("eval", 1)):
        marker = EndOfSplit(run_id=run_id, split=split, producer="seed", samples_published=n,
                            run_spec_hash=spec.spec_hash())  # fmt: skip
        await bus.publish(subjects.samples(split), marker)
    result = await Trainer(bus, run_id, resume=True).run()

    assert result.resumed_from == 2 and result.step == 4 and result.final is not None
    resumed = {e["step"]: e["samples"] for e in trained_log(spec)}
    assert sorted(resumed) == [1, 2, 3, 4] and sorted(resumed[3] + resumed[4]) == sorted(rest)
    assert not any(store.exists(r.features) for r in refs["train"])
    assert all(store.exists(r.features) for r in refs["eval"])
    store.close()


@pytest.mark.parametrize(
    ("over", "reason"),
    [({"train": train_spec(consume_features=True, epochs=2)}, "train.epochs is 2"),
     ({"train": CONSUME, "data_run": "some-other-run"}, "it replays run 'some-other-run'")],
    ids=["epochs", "replay"],
)  # fmt: skip
async def test_consume_once_is_refused_where_samples_are_needed_again(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, over: dict, reason: str
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, **over)
    await bus.ensure_streams(run_id)
    await bus.put_run_spec(spec)
    with pytest.raises(TrainerError, match=f"cannot use train.consume_features: {reason}"):
        await Trainer(bus, run_id).run()
