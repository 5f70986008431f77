"""``specforge sweep``: a finished run's features (both splits + vocab map) leave the store; an
unfinished run is refused unless forced. Real bus, real Mooncake master + holder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from specforge_cli.sweep import SweepRefused, sweep_run
from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, EnqueueSummary, EvalResult
from specforge_common.featurestore import open_store
from specforge_common.subjects import RunSubjects, enqueue_key
from specforge_common.targets import make_tiny_target
from tests.mooncake_support import mooncake_master, mooncake_uri  # noqa: F401 - fixture
from tests.support import seed_captured_run, tiny_run_spec


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


@pytest.fixture(scope="module")
def client(mooncake_master):  # noqa: F811 - the imported fixture
    """One client for the module (a close takes ~1 s); tests open namespaced views of it."""
    opened = open_store(mooncake_uri(mooncake_master, "sweep-tests"))
    yield opened
    opened.close()


async def seeded_run(bus: Bus, run_id: str, target: Path, tmp_path: Path, client):
    spec = tiny_run_spec(run_id, target, tmp_path, store_uri=client.uri)
    refs = await seed_captured_run(bus, spec, n_train=5, n_eval=2, seed=1)
    summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    return spec, refs, summary


async def publish_checkpoint(bus: Bus, spec, step: int, *, final: bool, evaluated: bool) -> None:
    subjects = RunSubjects(spec.run_id)
    event = CheckpointEvent(run_id=spec.run_id, step=step, final=final, samples_consumed=step,
                            last_sequence={0: step}, checkpoint_uri=f"/nowhere/step-{step}",
                            checkpoint_sha256="0" * 64, run_spec_hash=spec.spec_hash())  # fmt: skip
    await bus.publish(subjects.checkpoints, event)
    if evaluated:
        result = EvalResult(run_id=spec.run_id, step=step, checkpoint_sha256="0" * 64,
                            acceptance_rates=[0.5], run_spec_hash=spec.spec_hash())  # fmt: skip
        await bus.publish(subjects.evals, result)


async def test_sweeping_a_finished_run_empties_the_store_of_its_samples(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, client
) -> None:
    other, other_refs, _ = await seeded_run(bus, f"{run_id}-other", target, tmp_path, client)
    before = client.used_bytes()
    spec, refs, summary = await seeded_run(bus, run_id, target, tmp_path, client)
    seeded = client.used_bytes()
    client.delete(refs["train"][0].features)  # consumed by the trainer already
    await publish_checkpoint(bus, spec, 0, final=False, evaluated=True)
    await publish_checkpoint(bus, spec, 3, final=True, evaluated=True)

    report = await sweep_run(bus, run_id, client)

    everything = refs["train"] + refs["eval"]
    assert not any(client.exists(r.features) for r in everything)
    assert not client.exists(summary.vocab_map)
    assert report.removed == {"train": 4, "eval": 2} and report.absent == 1
    assert report.vocab_map == "removed" and report.failed == 0
    swept = sum(r.features.nbytes for r in everything[1:]) + summary.vocab_map.nbytes
    assert report.removed_bytes == swept
    assert client.used_bytes() == before  # the master holds exactly what it held before
    assert seeded - before == swept + refs["train"][0].features.nbytes
    # Another run's samples in the same store are untouched.
    assert all(client.exists(r.features) for r in other_refs["train"] + other_refs["eval"])
    # Sweeping again is harmless: everything is already absent.
    again = await sweep_run(bus, run_id, client)
    assert again.removed == {} and again.absent == 7 and again.vocab_map == "absent"
    await sweep_run(bus, other.run_id, client, force=True)


async def test_an_unfinished_run_is_refused_unless_forced(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, client, nats_server
) -> None:
    spec, refs, summary = await seeded_run(bus, run_id, target, tmp_path, client)
    with pytest.raises(SweepRefused, match="no final checkpoint yet"):
        await sweep_run(bus, run_id, client)
    await publish_checkpoint(bus, spec, 2, final=True, evaluated=False)
    with pytest.raises(SweepRefused, match=r"final checkpoint \(step 2\) has no EvalResult"):
        await sweep_run(bus, run_id, client)
    assert all(client.exists(r.features) for r in refs["train"] + refs["eval"])

    command = [sys.executable, "-m", "specforge_cli", "sweep", "--run", run_id,
               "--nats", nats_server.url, "--force"]  # fmt: skip
    forced = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "removed   7 samples (2 eval, 5 train)" in forced.stdout
    assert "vocab map removed" in forced.stdout
    assert not any(client.exists(r.features) for r in refs["train"] + refs["eval"])
    assert not client.exists(summary.vocab_map)
