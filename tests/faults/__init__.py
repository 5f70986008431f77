"""The fault matrix: services killed (SIGKILL) at chosen points, as real processes against a real
nats-server; each test then checks the run's invariants (docs/operations.md, "Faults").

Kill points are armed with ``SPECFORGE_FAULT`` (``specforge_common.faults``), so a test kills
exactly where it means to, without sleeps; the restarted process runs unarmed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

SPECFORGE = [sys.executable, "-m", "specforge_cli"]
ACK_WAIT_S = 2.0  # a killed holder's deliveries come back this fast
KILLED = -signal.SIGKILL


def env(fault: str | None = None) -> dict[str, str]:
    """The caller's environment minus SPECFORGE_* (JSON logs, defaults), plus the fault."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("SPECFORGE_")}
    out |= {"OMP_NUM_THREADS": "1", "SPECFORGE_ACK_WAIT_S": str(ACK_WAIT_S)}
    if fault:
        out["SPECFORGE_FAULT"] = fault
    return out


async def spawn(command: str, *args: str, fault: str | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *SPECFORGE, command, *args, "--device", "cpu",
        *(() if command == "evaluate" else ("--threads", "1")),  # evaluate: OMP_NUM_THREADS
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env(fault),
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process, timeout: float = 180) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a process (killed if it outlives ``timeout``)."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"still running after {timeout}s: {err.decode()[-3000:]}") from None
    return proc.returncode, out.decode(), err.decode()


async def run(command: str, *args: str, fault: str | None = None,
              timeout: float = 180) -> tuple[int, str, str]:  # fmt: skip
    return await finish(await spawn(command, *args, fault=fault), timeout)


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(root: Path) -> list[Path]:
    """Temp files a killed writer left behind (never read as samples: not *.safetensors)."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
