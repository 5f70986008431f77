"""``specforge train`` as a user runs it: a real process against a seeded run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from specforge_common.bus import Bus
from specforge_common.contracts import TrainerProgress
from specforge_common.eagle3.layout import CONFIG_NAME, WEIGHTS_NAME
from specforge_common.subjects import progress_key
from specforge_common.targets import make_tiny_target
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import drop_end_markers, train_spec

SPECFORGE = [sys.executable, "-m", "specforge_cli"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def train_command(run_id: str, nats_url: str) -> list[str]:
    return [*SPECFORGE, "train", "--run", run_id, "--nats", nats_url, "--device", "cpu",
            "--threads", "1", "--spec-timeout", "20"]  # fmt: skip


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_train_runs_to_the_end_of_data_and_prints_the_final_draft(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(epochs=2, log_every=2))
    await seed_captured_run(bus, spec, n_train=6)
    proc = await asyncio.create_subprocess_exec(
        *train_command(run_id, nats_server.url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 0, err
    final = tmp_path / "runs" / run_id / "checkpoints" / "step-00000006"
    assert f"final draft: {final}" in out
    assert (final / WEIGHTS_NAME).is_file() and (final / CONFIG_NAME).is_file()
    logs = json_lines(err)
    steps = [line for line in logs if line.get("event") == "train"]
    assert [line["step"] for line in steps] == [2, 4, 6]
    assert all(line["service"] == "trainer" and line["run"] == run_id for line in steps)
    assert {"lr", "grad_norm", "loss", "acc_0", "simulated_acc_len", "samples_per_s",
            "tokens_per_s", "data_wait"} <= steps[0].keys()  # fmt: skip
    progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
    assert progress.done and progress.step == 6


async def test_sigterm_checkpoints_the_current_step_and_exits_0(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=100))
    await seed_captured_run(bus, spec, n_train=8)
    await drop_end_markers(bus, run_id)  # capture "still running": the trainer waits for more
    proc = await asyncio.create_subprocess_exec(
        *train_command(run_id, nats_server.url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):
            progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
            if progress is not None and progress.step == 3:
                break
            assert proc.returncode is None
            await asyncio.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    step_dir = tmp_path / "runs" / run_id / "checkpoints" / "step-00000003"
    assert f"stopped at step 3; checkpoint: {step_dir}" in stdout.decode()
    assert (step_dir / WEIGHTS_NAME).is_file()
    progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
    assert not progress.done and progress.step == 3
