"""A capture worker's metrics, scraped over HTTP from its live endpoint: real nats-server, real
tiny target, real file store."""

from __future__ import annotations

import asyncio
import math

import msgspec

from specforge_common.bus import open_bus
from tests.capture.test_worker import (
    TIMEOUT,
    FlakyEngine,
    make_spec,
    new_worker,
    samples_log,
    start_run,
    token_tasks,
)
from tests.metrics_support import ascrape, scrape_until, value


async def test_a_served_worker_exports_its_totals_latencies_and_lag(
    bus_config, run_id, target_dir, engine, tmp_path
) -> None:
    spec = make_spec(run_id, target_dir, tmp_path)
    tasks = token_tasks(spec, 6)
    foreign = msgspec.structs.replace(tasks[0], prompt_id="foreign", run_spec_hash="other")
    poison = msgspec.structs.replace(
        tasks[0], prompt_id="poison", input_ids=[FlakyEngine.POISON, 7, 8], loss_mask=[0, 1, 1]
    )
    run = {"run": run_id}

    def settled(samples) -> bool:
        return (value(samples, "specforge_capture_prompts_total", **run) == len(tasks)
                and value(samples, "specforge_capture_dead_letters_total", **run) == 2)  # fmt: skip

    # max_deliver 2: the poison prompt is naked once, then dead-lettered; the foreign one at once
    async with await open_bus(msgspec.structs.replace(bus_config, max_deliver=2)) as bus:
        await start_run(bus, spec, [*tasks, foreign, poison], summary=False)
        worker = new_worker(bus, spec, FlakyEngine(engine), exit_when_done=False,
                            backoff_s=(0.05, 0.1))  # fmt: skip
        endpoint = worker.metrics.serve(0)
        assert endpoint is not None
        try:
            running = asyncio.create_task(worker.run())  # live: polls for prompts until stopped
            samples = await scrape_until(endpoint.url, settled, timeout=TIMEOUT)
            assert not running.done()
            worker.stop()
            stats = await asyncio.wait_for(running, TIMEOUT)
            final = await ascrape(endpoint.url)  # the last lag reading, taken on the way out
        finally:
            worker.metrics.close()
        refs, _ = await samples_log(bus, run_id)

    tokens = sum(len(t.input_ids) for t in tasks)
    assert value(samples, "specforge_capture_tokens_total", **run) == tokens == stats.tokens
    assert value(samples, "specforge_capture_store_bytes_total", **run) == sum(
        r.features.nbytes for r in refs
    )
    # the flaky engine's first forward fails (its rows retried one by one), the poison row always
    assert value(samples, "specforge_capture_naks_total", **run) == 1 == stats.retried
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
