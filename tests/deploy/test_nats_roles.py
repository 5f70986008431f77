"""The real commands under the shipped ``deploy/nats-server.conf``: enqueue, capture, train and
evaluate run as separate processes, each logged in as its own role's user, and finish a tiny run
without one permission refusal (what the per-role permission lists were derived from)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specforge_common.bus import open_bus
from specforge_common.contracts import CheckpointEvent, EvalResult
from specforge_common.nats_server import terminate
from specforge_common.targets.tiny import make_tiny_target
from tests.common.bus.roles import PASSWORDS, role_config, role_server
from tests.test_end_to_end import write_config, write_dataset


def role_env(url: str, role: str) -> dict[str, str]:
    return os.environ | {
        "SPECFORGE_NATS_URL": url,
        "SPECFORGE_NATS_USER": f"specforge-{role}",
        "SPECFORGE_NATS_PASSWORD": PASSWORDS[role],
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
async def test_each_service_runs_as_its_own_role(tmp_path: Path, run_id: str) -> None:
    target = make_tiny_target(tmp_path / "tiny", arch="llama", seed=0)
    data = tmp_path / "conversations.jsonl"
    write_dataset(data, 12)
    config = write_config(tmp_path / "run.toml", target)
    config.write_text(config.read_text().replace("epochs = 4", "epochs = 1").replace(
        "[target]", f'store_uri = "file://{tmp_path}/features"\noutput_dir = "{tmp_path}/runs"'
        "\n[target]"))  # fmt: skip
    cli = [sys.executable, "-m", "specforge_cli"]
    with role_server(tmp_path) as server:
        enqueue = subprocess.run([*cli, "enqueue", "--run", run_id, "--config", str(config),
                                  str(data)], env=role_env(server.url, "enqueue"),
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        assert enqueue.returncode == 0, enqueue.stdout + enqueue.stderr
        commands = {
            "capture": ["capture", "--exit-when-done", "--device", "cpu"],
            "trainer": ["train", "--device", "cpu"],
            "evaluator": ["evaluate", "--exit-when-final", "--device", "cpu"],
        }
        logs = {role: (tmp_path / f"{role}.log").open("w+") for role in commands}
        processes = {
            role: subprocess.Popen([*cli, *argv, "--run", run_id], env=role_env(server.url, role),
                                   stdout=logs[role], stderr=subprocess.STDOUT, text=True)
            for role, argv in commands.items()
        }  # fmt: skip
        try:  # a refused service exits non-zero; the others would wait for it: stop them then
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and any(p.poll() is None for p in processes.values()):
                if any(p.poll() not in (None, 0) for p in processes.values()):
                    break
                time.sleep(0.5)
            failed = [role for role, p in processes.items() if p.poll() not in (None, 0)]
        finally:
            for process in processes.values():
                terminate(process)
        outputs = {role: (tmp_path / f"{role}.log").read_text() for role in commands}
        assert not failed, "\n".join(f"{role}:\n{outputs[role][-4000:]}" for role in failed)
        for role, process in processes.items():
            assert process.returncode == 0, f"{role}:\n{outputs[role][-4000:]}"
            assert "permissions violation" not in outputs[role].lower(), outputs[role][-4000:]
        assert "permissions violation" not in (enqueue.stdout + enqueue.stderr).lower()
        async with await open_bus(role_config(server.url, "operator")) as bus:
            checkpoints = [r async for _, r in bus.records(run_id, "checkpoints", CheckpointEvent)]
            evals = [r async for _, r in bus.records(run_id, "evals", EvalResult)]
        assert checkpoints and checkpoints[-1].final
        assert sorted(e.step for e in evals) == sorted(c.step for c in checkpoints)
