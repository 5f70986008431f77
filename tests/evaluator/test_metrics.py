"""The evaluator's metrics, scraped live over HTTP: in process, and from a real ``specforge
evaluate --metrics-port 0`` process (the port it picked comes from its log)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
from pathlib import Path

import pytest

from specforge_common.contracts import EvalResult, EvalSpec
from specforge_common.featurestore import open_store
from specforge_common.targets import make_tiny_target
from specforge_evaluator.metrics import EvaluatorMetrics
from specforge_evaluator.service import DURABLE, Evaluator
from tests.evaluator import build_draft, publish_checkpoint, read_stream, vocab_map_of_run
from tests.evaluator.test_command import start
from tests.metrics_support import ascrape, labelled, scrape_until, value
from tests.support import seed_captured_run, tiny_run_spec

K = 3  # tiny_run_spec's ttt_length


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


def evaluated(samples, run_id: str) -> float:
    return value(samples, "specforge_eval_checkpoints_total", run=run_id, outcome="evaluated")


def test_before_any_result_the_result_gauges_read_nan() -> None:
    registry = EvaluatorMetrics("r").registry
    for name in ("checkpoint_step", "lossless", "speedup", "serving_acceptance_length"):
        assert math.isnan(registry.get_sample_value(f"specforge_eval_{name}", {"run": "r"}))
    labels = {"run": "r", "outcome": "evaluated"}
    assert registry.get_sample_value("specforge_eval_checkpoints_total", labels) == 0


async def test_a_served_evaluator_exports_the_last_result_and_its_lag(
    bus, run_id: str, target_dir: Path, tmp_path: Path
) -> None:
    settings = EvalSpec(max_samples=3, batch_size=3, serving_prompts=2)
    spec = tiny_run_spec(run_id, target_dir, tmp_path, eval=settings)
    await seed_captured_run(bus, spec, n_train=4, n_eval=3)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 2, checkpoint_sha256="0" * 64)  # dead-lettered
    await publish_checkpoint(bus, spec, draft, 4)
    service = Evaluator(bus, spec, open_store(spec.store_uri), fetch_timeout=0.2)
    endpoint = service.metrics.serve(0)
    assert endpoint is not None
    try:
        task = asyncio.create_task(service.run())  # no exit_when_final: runs until stopped
        samples = await scrape_until(endpoint.url, lambda s: evaluated(s, run_id) == 1)
        assert not task.done()
        service.stop()
        await asyncio.wait_for(task, 30)
        final = await ascrape(endpoint.url)
    finally:
        service.metrics.close()

    (result,) = await read_stream(bus, run_id, "evals", EvalResult)
    run = {"run": run_id}
    assert value(samples, "specforge_eval_checkpoints_total", **run, outcome="dead_lettered") == 1
    assert value(samples, "specforge_eval_checkpoint_step", **run) == 4 == result.step
    simulated = value(samples, "specforge_eval_simulated_acceptance_length", **run)
    assert simulated == pytest.approx(result.simulated_acceptance_length) and simulated >= 0
    serving = value(samples, "specforge_eval_serving_acceptance_length", **run)
    assert serving == pytest.approx(result.serving_acceptance_length) and serving >= 1
    assert value(samples, "specforge_eval_lossless", **run) == 1.0 and result.lossless is True
    speedup = value(samples, "specforge_eval_speedup", **run)
    assert math.isfinite(speedup) and speedup > 0
    rates = labelled(samples, "specforge_eval_acceptance_rate", "position")
    assert [rates[str(k)] for k in range(K)] == pytest.approx(result.acceptance_rates)
    assert all(0 <= r <= 1 for r in rates.values())
    assert value(samples, "specforge_eval_seconds_count", **run) == 1
    labels = {"run": run_id, "stream": f"SF_{run_id}_CHECKPOINTS", "consumer": DURABLE}
    assert value(final, "specforge_bus_consumer_pending", **labels) == 0
    assert value(final, "specforge_bus_consumer_ack_pending", **labels) == 0


async def read_log_until(stream: asyncio.StreamReader, event: str, timeout: float = 60) -> dict:
    """The first JSON log line of ``event`` the process writes."""

    async def scan() -> dict:
        while line := await stream.readline():
            if line.startswith(b"{") and (record := json.loads(line))["event"] == event:
                return record
        raise AssertionError(f"the process exited without logging {event!r}")

    return await asyncio.wait_for(scan(), timeout)


async def test_the_command_serves_metrics_on_a_free_loopback_port(
    bus, run_id: str, nats_server, target_dir: Path, tmp_path: Path
) -> None:
    offline_only = EvalSpec(max_samples=2, batch_size=2, serving_prompts=0)  # starts faster
    spec = tiny_run_spec(run_id, target_dir, tmp_path, eval=offline_only)
    await seed_captured_run(bus, spec, n_train=4, n_eval=2)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 0)
    proc = await start("--run", run_id, "--nats", nats_server.url, "--device", "cpu",
                       "--metrics-port", "0")  # fmt: skip
    try:
        assert proc.stderr is not None
        served = await read_log_until(proc.stderr, "metrics served")
        assert served["host"] == "127.0.0.1" and served["port"] > 0
        assert served["service"] == "evaluator" and served["run"] == run_id
        samples = await scrape_until(served["url"], lambda s: evaluated(s, run_id) == 1)
        assert value(samples, "specforge_eval_checkpoint_step", run=run_id) == 0
        assert value(samples, "specforge_eval_simulated_acceptance_length", run=run_id) >= 0
        # not measured (no serving prompts): NaN, not a made-up number
        assert math.isnan(value(samples, "specforge_eval_serving_acceptance_length", run=run_id))
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
