"""The evaluator's results in TensorBoard at each checkpoint's step, read back as TensorBoard
reads them (real nats-server, seeded capture, real speculative decoding)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from specforge_common.contracts import EvalResult, TrackingSpec
from specforge_common.featurestore import open_store
from specforge_common.targets import make_tiny_target
from specforge_common.tracking import TrackingUnavailable, open_tracker, tensorboard_dir
from specforge_evaluator.scalars import eval_scalars
from specforge_evaluator.service import Evaluator
from tests.evaluator import (
    build_draft,
    eval_samples,
    overfit,
    publish_checkpoint,
    read_stream,
    vocab_map_of_run,
)
from tests.support import seed_captured_run, tensorboard_scalars, tiny_run_spec

K = 3  # tiny_run_spec's ttt_length


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="the tensorboard extra is not installed")  # fmt: skip
async def test_each_result_is_in_tensorboard_at_its_checkpoint_step(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path, tracking=TrackingSpec(backend="tensorboard"))
    refs = await seed_captured_run(bus, spec, n_train=4, n_eval=3)
    # the trainer's scalars in the same directory: the evaluator must leave them alone
    train = open_tracker(spec, "train")
    train.log_scalars(8, {"train/loss": 2.0})
    train.close()
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 0)
    trained = overfit(draft, eval_samples(spec, refs["eval"]), spec)
    await publish_checkpoint(bus, spec, trained, 8, final=True)
    service = Evaluator(bus, spec, open_store(spec.store_uri), fetch_timeout=0.2,
                        exit_when_final=True)  # fmt: skip
    report = await asyncio.wait_for(service.run(), timeout=60)
    assert report.evaluated == [0, 8]

    results = await read_stream(bus, run_id, "evals", EvalResult)
    scalars = tensorboard_scalars(tensorboard_dir(spec) / "eval")
    # positions real decoding never reached have no serving rate: absent, like any NaN
    named = {"eval/simulated_acceptance_length", "eval/serving_acceptance_length",
             "eval/lossless", "eval/speedup", "eval/loss", "eval/seconds_serving",
             "eval/serving_acc_pos0", *(f"eval/acc_pos{k}" for k in range(K))}  # fmt: skip
    assert named <= set(scalars)
    published = {r.step: eval_scalars(r) for r in results}
    assert set(scalars) == set(published[0]) | set(published[8])
    for tag, points in scalars.items():
        assert points == [
            (step, pytest.approx(values[tag], rel=1e-6))
            for step, values in published.items()
            if tag in values
        ], tag
    by_step = dict(zip((0, 8), results, strict=True))
    for step, value in scalars["eval/serving_acceptance_length"]:
        assert value == pytest.approx(by_step[step].serving_acceptance_length, rel=1e-6)
        assert value >= 1.0
    for step, value in scalars["eval/simulated_acceptance_length"]:
        assert value == pytest.approx(by_step[step].simulated_acceptance_length, rel=1e-6)
        assert value >= 0.0
    for k in range(K):
        for step, value in scalars[f"eval/acc_pos{k}"]:
            assert value == pytest.approx(by_step[step].acceptance_rates[k], rel=1e-6)
            assert 0.0 <= value <= 1.0
    assert [v for _, v in scalars["eval/lossless"]] == [1.0, 1.0]  # temperature 0: lossless
    assert all(v > 0 for _, v in scalars["eval/speedup"])
    # the overfit checkpoint accepts more than the untrained one, in TensorBoard too
    (_, before), (_, after) = scalars["eval/acc_pos0"]
    assert after > before

    assert tensorboard_scalars(tensorboard_dir(spec) / "train") == {"train/loss": [(8, 2.0)]}


def test_unmeasured_results_are_absent_not_zero() -> None:
    """No serving prompts and no eval samples: no acceptance length, no lossless flag."""
    result = EvalResult(run_id="r", step=4, checkpoint_sha256="s", acceptance_rates=[],
                        metrics={"eval/samples": 0.0, "eval/no_data": 1.0,
                                 "draft_ms_per_token": float("nan")},
                        wall_seconds={"load": 0.5}, run_spec_hash="h")  # fmt: skip
    assert eval_scalars(result) == {"eval/samples": 0.0, "eval/no_data": 1.0,
                                    "eval/seconds_load": 0.5}  # fmt: skip


async def test_a_backend_that_is_not_installed_stops_the_evaluator_before_any_work(
    bus, run_id: str, target_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("mlflow", "mlflow.entities", "mlflow.exceptions", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # absent, whatever this machine has
    spec = tiny_run_spec(run_id, target_dir, tmp_path, tracking=TrackingSpec(backend="mlflow"))
    await bus.ensure_streams(run_id)
    service = Evaluator(bus, spec, open_store(spec.store_uri), fetch_timeout=0.2)
    with pytest.raises(TrackingUnavailable, match=r"pip install 'specforge-services\[mlflow\]'"):
        await asyncio.wait_for(service.run(), timeout=10)  # no eval split yet: it would wait
    assert service.eval_set is None
