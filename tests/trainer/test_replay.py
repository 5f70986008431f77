"""``specforge replay``: a new run trained on another run's recorded samples stream."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.featurestore import open_store
from specforge_common.step_log import read_step_log, trained_samples_path
from specforge_common.targets import make_tiny_target
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import stream_records, train_spec
from tests.trainer.test_command import SPECFORGE, train_command


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


async def specforge(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_replay_trains_bit_identical_weights_from_the_recorded_samples(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(epochs=2))
    await seed_captured_run(bus, spec, n_train=6, n_eval=1)
    rc, out, err = await specforge(*train_command(run_id, nats_server.url))
    assert rc == 0, err
    replayed = f"{run_id}-b"
    rc, out, err = await specforge(
        *SPECFORGE,
        "replay",
        "--from-run",
        run_id,
        "--run",
        replayed,
        "--nats",
        nats_server.url,
        "--device",
        "cpu",
        "--threads",
        "1",
    )
    assert rc == 0, err
    final = tmp_path / "runs" / replayed / "checkpoints" / "step-00000006"
    assert f"final draft: {final}" in out

    stored = await bus.get_run_spec(replayed)
    assert stored.data_run == run_id and stored.run_id == replayed
    assert stored.train == spec.train and stored.target == spec.target
    ours = load_file(tmp_path / "runs" / run_id / "checkpoints" / "step-00000006" /
                     WEIGHTS_NAME)  # fmt: skip
    theirs = load_file(final / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    log_a = read_step_log(trained_samples_path(tmp_path / "runs", run_id))
    log_b = read_step_log(trained_samples_path(tmp_path / "runs", replayed))
    assert [e["samples"] for e in log_a] == [e["samples"] for e in log_b] and len(log_b) == 6
    events = [e for _, e in await stream_records(bus, replayed, "checkpoints", CheckpointEvent)]
    assert events[-1].final and events[-1].run_spec_hash == stored.spec_hash()
    source_events = await stream_records(bus, run_id, "checkpoints", CheckpointEvent)
    assert [e.step for _, e in source_events] == [e.step for e in events]  # A's own, untouched

    # Overrides land in the copied spec; a replay of a replay reads the original samples.
    again = f"{run_id}-c"
    rc, out, err = await specforge(*SPECFORGE, "replay", "--from-run", replayed, "--run", again,
                                   "--set", "train.learning_rate=0.001", "--spec-only",
                                   "--nats", nats_server.url)  # fmt: skip
    assert rc == 0, err
    third = await bus.get_run_spec(again)
    assert third.data_run == run_id and third.train.learning_rate == 0.001
    assert third.train.epochs == spec.train.epochs


async def test_a_replay_may_train_another_draft_vocab_size_from_the_data_runs_counts(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """The samples log does not depend on the draft vocabulary: a replay with another
    ``draft.draft_vocab_size`` builds its map by the enqueue's rule over the data run's stored
    token counts, and exports a draft of that size."""
    from collections import Counter

    from specforge_common.eagle3 import build_vocab_map, vocab_map_of
    from specforge_common.eagle3.vocab import TokenCounter
    from specforge_trainer.loop import Trainer

    spec = tiny_run_spec(run_id, target, tmp_path, draft_vocab_size=128)
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=1)
    counter = TokenCounter()
    store = open_store(spec.store_uri)
    for ref in refs["train"]:
        sample = store.get(ref.features)
        counter.update(sample["input_ids"], sample["loss_mask"])
    wider = f"{run_id}-wide"
    await bus.ensure_streams(wider)
    await bus.put_run_spec(tiny_run_spec(wider, target, tmp_path, draft_vocab_size=200,
                                         data_run=run_id))  # fmt: skip
    trainer = Trainer(bus, wider)
    result = await trainer.run()
    vocab_map = vocab_map_of(trainer.parts.draft)
    assert vocab_map.draft_vocab_size == 200 and result.final is not None
    assert vocab_map == build_vocab_map(Counter(counter.counts), 512, 200)


def test_a_replay_of_samples_captured_for_another_algorithm_is_refused() -> None:
    from specforge_common.contracts import DraftSpec, RunSpec, TargetSpec
    from specforge_trainer.build import TrainerError, check_data_run

    target = TargetSpec(path="/t")
    data = RunSpec(run_id="eagle-data", target=target)
    replay = RunSpec(run_id="block", target=target, draft=DraftSpec(strategy="dflash"),
                     data_run="eagle-data")  # fmt: skip
    with pytest.raises(TrainerError, match="capture method is 'dflash'.*data run's is 'eagle3'"):
        check_data_run(replay, data)
    check_data_run(RunSpec(run_id="again", target=target, data_run="eagle-data"), data)
