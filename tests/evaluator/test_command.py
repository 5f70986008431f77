"""``specforge evaluate`` as a user runs it: a real process against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from specforge_common.contracts import EvalResult
from specforge_common.targets import make_tiny_target
from tests.evaluator import build_draft, publish_checkpoint, read_stream, vocab_map_of_run
from tests.support import seed_captured_run, tiny_run_spec

SPECFORGE = [sys.executable, "-m", "specforge_cli"]
# The command must choose JSON logs itself; no format override from the caller's environment.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SPECFORGE_")} | {
    "OMP_NUM_THREADS": "1"
}


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *SPECFORGE, "evaluate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )  # fmt: skip


async def evaluate(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``specforge evaluate`` without blocking the event loop (the test's bus stays live)."""
    proc = await start(*args)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, stderr.decode()


async def test_evaluate_exits_0_after_the_final_checkpoint(
    bus, run_id: str, nats_server, target_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    spec = tiny_run_spec(run_id, target_dir, tmp_path)
    await seed_captured_run(bus, spec, n_train=4, n_eval=3)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 0)
    await publish_checkpoint(bus, spec, draft, 4, final=True)

    code, stderr = await evaluate("--run", run_id, "--nats", nats_server.url, "--device", "cpu",
                                  "--exit-when-final")  # fmt: skip
    assert code == 0, stderr
    assert [r.step for r in await read_stream(bus, run_id, "evals", EvalResult)] == [0, 4]
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    evaluated = [line for line in lines if line["event"] == "checkpoint evaluated"]
    assert [line["step"] for line in evaluated] == [0, 4]
    assert all(line["service"] == "evaluator" and line["run"] == run_id for line in evaluated)
    assert all(len(line["acc"]) == spec.train.ttt_length for line in evaluated)


async def test_evaluate_without_a_run_spec_exits_1(bus, run_id: str, nats_server) -> None:
    code, stderr = await evaluate("--run", run_id, "--nats", nats_server.url, "--spec-timeout",
                                  "0.5")  # fmt: skip
    assert code == 1, stderr
    assert "no run spec" in stderr


async def test_sigterm_stops_the_service_cleanly(
    bus, run_id: str, nats_server, target_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target_dir, tmp_path)
    await seed_captured_run(bus, spec, n_train=4, n_eval=2)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 0)
    proc = await start("--run", run_id, "--nats", nats_server.url, "--device", "cpu")
    try:
        for _ in range(300):
            if await bus.stream_depth(run_id, "evals") or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert await bus.stream_depth(run_id, "evals") == 1
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert '"event": "stopped"' in stderr.decode()
