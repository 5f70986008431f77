"""A replayed run (``specforge replay --from-run A --run B``) is evaluated and reported like any
other: on A's eval split, from A's streams, with its own checkpoints and results."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from specforge_common.contracts import EvalResult, EvalSpec, RunSpec
from specforge_common.featurestore import open_store
from specforge_common.targets import make_tiny_target
from specforge_evaluator.report import write_report
from specforge_evaluator.service import Evaluator
from tests.evaluator import build_draft, publish_checkpoint, read_stream, vocab_map_of_run
from tests.evaluator.test_command import evaluate
from tests.support import seed_captured_run, tiny_run_spec


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


async def replayed_run(bus, run_id: str, target_dir: Path, tmp_path: Path) -> RunSpec:
    """Run ``run_id`` captured (2 train, 3 eval samples), and ``<run_id>-b`` replaying it with
    another learning rate, one final checkpoint published; B's spec."""
    spec = tiny_run_spec(run_id, target_dir, tmp_path,
                         eval=EvalSpec(max_samples=8, batch_size=4, serving_prompts=0))  # fmt: skip
    await seed_captured_run(bus, spec, n_train=2, n_eval=3)
    train = msgspec.structs.replace(spec.train, learning_rate=1e-3)
    replay = msgspec.structs.replace(spec, run_id=f"{run_id}-b", data_run=run_id, train=train)
    await bus.ensure_streams(replay.run_id)
    await bus.put_run_spec(replay)
    draft = build_draft(replay, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, replay, draft, 2, final=True)
    return replay


async def test_evaluate_scores_a_replayed_run_on_its_data_runs_eval_split(
    bus, run_id: str, nats_server, target_dir: Path, tmp_path: Path
) -> None:
    """Regression: ``specforge evaluate --run B`` waited forever for eval samples on B's own
    (empty) streams."""
    replay = await replayed_run(bus, run_id, target_dir, tmp_path)

    code, stderr = await evaluate("--run", replay.run_id, "--nats", nats_server.url, "--device",
                                  "cpu", "--exit-when-final", timeout=90)  # fmt: skip
    assert code == 0, stderr[-3000:]
    (result,) = await read_stream(bus, replay.run_id, "evals", EvalResult)
    assert (result.step, result.run_spec_hash) == (2, replay.spec_hash())
    assert result.metrics["eval/samples"] == 3 and result.metrics["eval/samples_skipped"] == 0
    assert await bus.stream_depth(run_id, "evals") == 0  # A's results are A's alone


async def test_the_evaluator_finds_the_data_run_itself_and_the_report_names_it(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    replay = await replayed_run(bus, run_id, target_dir, tmp_path)
    # No data_spec given: prepare() looks the data run up itself.
    service = Evaluator(bus, replay, open_store(replay.store_uri), fetch_timeout=0.2,
                        exit_when_final=True)  # fmt: skip
    report = await asyncio.wait_for(service.run(), timeout=60)
    assert report.evaluated == [2] and service.eval_set is not None
    assert len(service.eval_set.samples) == 3

    written = await write_report(bus, replay.run_id, tmp_path / "report")
    summary = written.markdown.read_text()
    assert f"replayed from run {run_id} (2 train, 3 eval samples enqueued)" in summary
    assert "evaluated checkpoints: 1" in summary
