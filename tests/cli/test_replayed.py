"""``specforge status`` and ``specforge sweep`` of a replayed run read its data run's sample
streams: B (``replay --from-run A --run B``) owns no prompts, samples or features of its own."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from specforge_cli.status import status_lines
from specforge_cli.sweep import SweepRefused, sweep_run
from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, EvalResult, RunSpec
from specforge_common.featurestore import open_store
from specforge_common.subjects import RunSubjects
from specforge_common.targets import make_tiny_target
from tests.support import seed_captured_run, tiny_run_spec


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


async def finish(bus: Bus, spec: RunSpec, step: int) -> None:
    """A final checkpoint and its evaluation (the run is over)."""
    subjects = RunSubjects(spec.run_id)
    event = CheckpointEvent(run_id=spec.run_id, step=step, final=True, samples_consumed=step,
                            last_sequence={0: step}, checkpoint_uri="/nowhere",
                            checkpoint_sha256="0" * 64, run_spec_hash=spec.spec_hash())  # fmt: skip
    await bus.publish(subjects.checkpoints, event)
    await bus.publish(subjects.evals, EvalResult(run_id=spec.run_id, step=step,
                                                 checkpoint_sha256="0" * 64, acceptance_rates=[],
                                                 run_spec_hash=spec.spec_hash()))  # fmt: skip


async def test_status_and_sweep_of_a_replayed_run_read_the_data_runs_streams(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=3, n_eval=2)
    replay = msgspec.structs.replace(spec, run_id=f"{run_id}-b", data_run=run_id)
    await bus.ensure_streams(replay.run_id)
    await bus.put_run_spec(replay)

    lines = await status_lines(bus, replay.run_id)
    assert lines[0].endswith(f"replays the samples of run {run_id}")
    (samples,) = [line for line in lines if line.strip().startswith("samples")]
    assert f"samples ({run_id})" in samples and " 7 msgs" in samples  # 5 refs + 2 markers
    (evals,) = [line for line in lines if line.strip().startswith("evals")]
    assert " 0 msgs" in evals  # B's own results

    store = open_store(spec.store_uri)
    with pytest.raises(SweepRefused, match="no final checkpoint"):
        await sweep_run(bus, replay.run_id, store)
    await finish(bus, replay, 3)
    with pytest.raises(SweepRefused, match=f"replays the samples of run '{run_id}'"):
        await sweep_run(bus, replay.run_id, store)  # A's features: A (or its replays) may need them
    assert all(store.exists(r.features) for r in refs["train"] + refs["eval"])

    report = await sweep_run(bus, replay.run_id, store, force=True)
    assert report.removed == {"train": 3, "eval": 2} and report.data_run == run_id
    assert report.vocab_map == "removed"
    assert not any(store.exists(r.features) for r in refs["train"] + refs["eval"])
    assert f"(the samples of run {run_id})" in report.lines()[0]
