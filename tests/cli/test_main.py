"""The specforge command as a user runs it: a real process, real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SPECFORGE = [sys.executable, "-m", "specforge_cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPECFORGE, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("nats-server", "status", "smoke", "run"):
        assert command in out.stdout


def test_smoke_moves_every_sample_through_bus_and_store(tmp_path: Path) -> None:
    out = run("smoke", "--samples", "30", "--max-tokens", "64", "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "samples consumed   30" in out.stdout
    assert "replay from seq 1  30 samples, in order: True" in out.stdout
    assert len(list((tmp_path / "features").rglob("*.safetensors"))) == 30


async def test_status_reports_streams_and_consumers(bus, run_id: str, nats_server) -> None:
    from specforge_common.contracts import PromptTask

    subjects = await bus.ensure_streams(run_id)
    for i in range(3):
        task = PromptTask(run_id=run_id, prompt_id=f"p{i}", split="train", input_ids=[1])
        await bus.publish(subjects.prompts, task, f"p{i}")
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="t")
    out = run("status", "--run", run_id, "--nats", nats_server.url)
    await consumer.close()
    assert out.returncode == 0, out.stderr
    assert "no run spec stored" in out.stdout
    prompts_line = next(line for line in out.stdout.splitlines() if "prompts" in line)
    assert " 3 msgs" in prompts_line
    assert "consumer capture" in out.stdout and "pending        3" in out.stdout


@pytest.mark.parametrize("args", [["status"], ["nope"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args).returncode == 2
