"""``specforge capture`` as real processes against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from specforge_common.targets import make_tiny_target
from tests.capture.test_worker import (
    check_samples,
    make_spec,
    samples_log,
    start_run,
    stored_files,
    token_tasks,
)

SPECFORGE = [sys.executable, "-m", "specforge_cli"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("capture-cmd-target") / "tiny", seed=0)


def spawn(run_id: str, url: str, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECFORGE_LOG")}
    return subprocess.Popen(
        [
            *SPECFORGE,
            "capture",
            "--run",
            run_id,
            "--nats",
            url,
            "--device",
            "cpu",
            "--threads",
            "1",
            *extra,
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


async def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, list[dict]]:
    """Exit code and the JSON log lines of a process (every stderr line must be JSON)."""
    _, err = await asyncio.to_thread(proc.communicate, timeout=timeout)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    return proc.returncode, lines


async def test_two_processes_share_the_queue_and_stop_cleanly(
    bus, run_id, nats_server, target_dir, tmp_path
) -> None:
    """p0 exits by itself once the queue is drained; p1 (no --exit-when-done) keeps polling
    until SIGTERM. Together they capture every prompt exactly once."""
    import torch

    from specforge_common.targets import HFTargetEngine

    spec = make_spec(run_id, target_dir, tmp_path, batch_size=2)
    tasks = token_tasks(spec, 24, seed=10)
    await start_run(bus, spec, tasks, summary=True)
    p0 = spawn(run_id, nats_server.url, "--exit-when-done", "--producer-id", "p0")
    p1 = spawn(run_id, nats_server.url, "--producer-id", "p1")
    try:
        code, lines0 = await finish(p0)
        assert code == 0, lines0[-5:]
        assert p1.poll() is None  # still running: it was not told to exit when done
        p1.send_signal(signal.SIGTERM)
        code, lines1 = await finish(p1, timeout=60)
        assert code == 0, lines1[-5:]
    finally:
        for proc in (p0, p1):
            if proc.poll() is None:
                proc.kill()
    for lines in (lines0, lines1):  # JSON lines only, every one bound to the service and run
        assert all(line.get("service") == "capture" and line.get("run") == run_id
                   for line in lines)  # fmt: skip
        assert any(line["event"] == "capture worker stopped" for line in lines)
    assert any("signal received" in line["event"] for line in lines1)

    refs, ends = await samples_log(bus, run_id)
    torch.set_num_threads(1)
    check_samples(spec, HFTargetEngine.from_pretrained(target_dir), tasks, refs)
    assert {r.producer for r in refs} <= {"p0", "p1"}
    assert sorted(e.split for e in ends) == ["eval", "train"]
    assert len(stored_files(spec)) == 24
    assert await bus.stream_depth(run_id, "prompts") == 0
    lag = await bus.consumer_lag(run_id, "prompts", "capture")
    assert (lag.num_pending, lag.num_ack_pending) == (0, 0)


async def test_missing_run_spec_exits_1_with_a_clear_message(run_id, nats_server) -> None:
    proc = spawn(run_id, nats_server.url, "--spec-timeout", "0.5")
    code, lines = await finish(proc, timeout=60)
    assert code == 1
    assert any("no run spec stored" in line["event"] for line in lines)


def test_capture_is_a_registered_command() -> None:
    out = subprocess.run([*SPECFORGE, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "capture" in out.stdout


async def test_a_dead_workers_prompts_go_to_the_next_one_within_the_ack_wait(
    bus_config, run_id, nats_server, target_dir, tmp_path
) -> None:
    """A worker that fetched prompts and vanished (its connection gone, nothing acked, as after
    kill -9) delays them by one ack wait: 10 s by default, not a minute. A capture process
    then captures every prompt once."""
    import time

    from specforge_common.bus import DEFAULT_ACK_WAIT_S, open_bus
    from specforge_common.contracts import PromptTask

    assert DEFAULT_ACK_WAIT_S <= 10
    async with await open_bus(bus_config) as bus:
        spec = make_spec(run_id, target_dir, tmp_path, batch_size=2)
        tasks = token_tasks(spec, 6, seed=12)
        await start_run(bus, spec, tasks, summary=True)
        async with await open_bus(bus_config) as doomed:  # the worker that dies
            consumer = await doomed.work_consumer(run_id, "prompts", "capture", PromptTask,
                                                  service="capture")  # fmt: skip
            held = await consumer.fetch(4, timeout=5)
            assert len(held) == 4
        died = time.monotonic()
        lag = await bus.consumer_lag(run_id, "prompts", "capture")
        assert lag.ack_wait_s == pytest.approx(DEFAULT_ACK_WAIT_S)

        # The next worker: the two prompts nobody held at once, the dead one's after the wait.
        rescuer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask,
                                          service="capture")  # fmt: skip
        fresh = await rescuer.fetch(4, timeout=5)
        assert [d.deliveries for d in fresh] == [1, 1]
        dead = {d.record.prompt_id for d in held}
        back, again = [], []  # the dead worker's prompts; the rescuer's own, redelivered
        while len(back) < 4 and time.monotonic() - died < 3 * DEFAULT_ACK_WAIT_S:
            for delivery in await rescuer.fetch(4 - len(back), timeout=DEFAULT_ACK_WAIT_S):
                (back if delivery.record.prompt_id in dead else again).append(delivery)
        took = time.monotonic() - died
        assert sorted(d.record.prompt_id for d in back) == sorted(dead)
        assert all(d.deliveries == 2 for d in back)
        assert took < DEFAULT_ACK_WAIT_S + 5, took
        for delivery in fresh + back:
            await delivery.nak()  # handed on to the capture process
        await rescuer.close()

        proc = spawn(run_id, nats_server.url, "--exit-when-done", "--producer-id", "next")
        code, lines = await finish(proc, timeout=300)
        assert code == 0, lines[-5:]
        refs, _ = await samples_log(bus, run_id)
        assert sorted(r.prompt_id for r in refs) == sorted(t.prompt_id for t in tasks)
