"""The trainer's metrics, scraped over HTTP from its endpoint after a tiny seeded run: real
nats-server, real store, real torch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from specforge_common.bus import Bus
from specforge_common.targets import make_tiny_target
from specforge_trainer.loop import Trainer
from tests.metrics_support import ascrape, labelled, value
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import train_spec


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


async def test_a_served_trainer_exports_its_log_window_step_times_and_lag(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(epochs=1, log_every=1))
    await seed_captured_run(bus, spec, n_train=6, n_eval=2)
    trainer = Trainer(bus, run_id)
    endpoint = trainer.metrics.serve(0)
    assert endpoint is not None
    try:
        before = await ascrape(endpoint.url)
        assert math.isnan(value(before, "specforge_trainer_loss", run=run_id))  # none logged yet
        result = await trainer.run()
        samples = await ascrape(endpoint.url)
    finally:
        trainer.metrics.close()

    run = {"run": run_id}
    last = result.history[-1]  # the last log line: the gauges hold the same numbers
    assert result.step == 3  # 6 samples, batch 2, one epoch
    assert value(samples, "specforge_trainer_optimizer_step", **run) == 3
    assert value(samples, "specforge_trainer_samples_consumed", **run) == 6
    loss = value(samples, "specforge_trainer_loss", **run)
    assert math.isfinite(loss) and loss > 0 and loss == pytest.approx(last["loss"])
    assert value(samples, "specforge_trainer_learning_rate", **run) == pytest.approx(last["lr"])
    grad_norm = value(samples, "specforge_trainer_grad_norm", **run)
    assert math.isfinite(grad_norm) and grad_norm > 0
    assert value(samples, "specforge_trainer_tokens_per_second", **run) > 0
    assert value(samples, "specforge_trainer_samples_per_second", **run) > 0
    assert 0 <= value(samples, "specforge_trainer_data_wait_fraction", **run) <= 1
    assert value(samples, "specforge_trainer_simulated_acceptance_length", **run) >= 0
    accuracy = labelled(samples, "specforge_trainer_accuracy", "position")
    assert sorted(accuracy) == ["0", "1", "2"]  # ttt_length 3
    assert all(0 <= a <= 1 for a in accuracy.values())
    assert accuracy["0"] == pytest.approx(last["acc_0"])
    assert value(samples, "specforge_trainer_step_seconds_count", **run) == 3
    assert value(samples, "specforge_trainer_step_seconds_sum", **run) > 0
    # An ordered reader: how far the samples stream's end is past what the weights have seen.
    state = await bus.stream_state(run_id, "samples")
    pending = value(samples, "specforge_bus_consumer_pending", **run,
                    stream=f"SF_{run_id}_SAMPLES", consumer="trainer")  # fmt: skip
    assert pending == state.last_seq - result.last_sequence >= 0
