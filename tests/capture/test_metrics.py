"""A capture worker's metrics, scraped over HTTP from its live endpoint: real nats-server, real
tiny target, real file store."""

from __future__ import annotations

import asyncio
import math

import msgspec

from tests.capture.test_worker import (
    TIMEOUT,
    make_spec,
    new_worker,
    samples_log,
    start_run,
    token_tasks,
)
from tests.metrics_support import ascrape, value


async def test_a_served_worker_exports_its_totals_latencies_and_lag(
    bus, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 6)
    foreign = msgspec.structs.replace(tasks[0], prompt_id="foreign", run_spec_hash="other")
    await start_run(bus, spec, [*tasks, foreign], summary=False)
    worker = new_worker(bus, spec, engine, exit_when_done=False)
    endpoint = worker.metrics.serve(0)
    assert endpoint is not None
    try:
        running = asyncio.create_task(worker.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        run = {"run": run_id}
        while True:  # live: the worker keeps polling for prompts until stopped
            samples = await ascrape(endpoint.url)
            if value(samples, "specforge_capture_prompts_total", **run) == len(tasks):
                break
            assert not running.done() and loop.time() < deadline, "prompts never all captured"
            await asyncio.sleep(0.1)
        worker.stop()
        stats = await asyncio.wait_for(running, TIMEOUT)
        final = await ascrape(endpoint.url)  # after the run: the last lag reading
    finally:
        worker.metrics.close()

    refs, _ = await samples_log(bus, run_id)
    tokens = sum(len(t.input_ids) for t in tasks)
    assert value(samples, "specforge_capture_tokens_total", **run) == tokens == stats.tokens
    assert value(samples, "specforge_capture_store_bytes_total", **run) == sum(
        r.features.nbytes for r in refs
    )
    assert value(samples, "specforge_capture_dead_letters_total", **run) == 1  # the foreign one
    assert value(samples, "specforge_capture_naks_total", **run) == 0
    rate = value(samples, "specforge_capture_tokens_per_second", **run)
    assert math.isfinite(rate) and rate > 0
    forwards = value(samples, "specforge_capture_forward_seconds_count", **run, mode="prefill")
    assert forwards == stats.forwards >= 2  # batch_size 4: six prompts need two forwards at least
    assert value(samples, "specforge_capture_forward_seconds_sum", **run, mode="prefill") > 0
    assert value(samples, "specforge_capture_store_write_seconds_count", **run) == len(tasks)
    # Everything fetched was settled (captured or dead-lettered), then read once more at the end.
    labels = {"run": run_id, "stream": f"SF_{run_id}_PROMPTS"}
    for consumer in ("capture", "recapture"):
        assert value(final, "specforge_bus_consumer_pending", **labels, consumer=consumer) == 0
        assert value(final, "specforge_bus_consumer_ack_pending", **labels, consumer=consumer) == 0
