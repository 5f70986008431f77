"""The Mooncake master and holder launchers and their CLI: real processes, clean stops, errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specforge_common.mooncake_processes import (
    MooncakeError,
    MooncakeHolder,
    MooncakeMaster,
    find_binary,
    free_port,
    missing_reason,
    parse_size,
)

REASON = missing_reason()
needs_mooncake = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _gauge(metrics: str, name: str) -> int:
    match = re.search(rf"^{name} (\d+)$", metrics, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return int(match.group(1))


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("text", "expected"),
    [(4096, 4096), ("4096", 4096), ("512MiB", 512 << 20), ("4GB", 4 << 30), ("2g", 2 << 30),
     ("64 KiB", 64 << 10), ("1T", 1 << 40)],
)  # fmt: skip
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1.5GB", "-1", "12 parsecs", -5])
def test_parse_size_refuses(text: int | str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@needs_mooncake
def test_master_and_holder_start_serve_and_stop_cleanly() -> None:
    with MooncakeMaster() as master:
        assert master.running and master.address.startswith("127.0.0.1:")
        assert master.health()["service_ready"] is True  # type: ignore[index]
        assert _gauge(master.metrics(), "master_total_capacity_bytes") == 0
        with MooncakeHolder(master.address, segment_size="64MiB") as holder:
            # Ready means mounted: the master already counts the segment.
            assert _gauge(master.metrics(), "master_total_capacity_bytes") == 64 << 20
            holder_port, workdir = holder.port, holder.log_path.parent  # type: ignore[union-attr]
            assert _listening(holder_port) and workdir.is_dir()
        assert not holder.running and holder.returncode == -signal.SIGTERM
        assert not workdir.exists() and not _listening(holder_port)
        master_port = master.port
    assert master.returncode == 0 and not master.running  # SIGTERM: a clean exit
    assert not _listening(master_port)


@needs_mooncake
def test_an_explicit_port_in_use_is_reported_not_retried() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        master = MooncakeMaster(metrics_port=port)
        with pytest.raises(MooncakeError, match=r"(?s)exited with code \d+ at start.*in use"):
            master.start()
        assert not master.running and master.log_path is None  # workdir cleaned up


def test_missing_binary_gives_an_actionable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MooncakeError, match="pip install mooncake-transfer-engine-non-cuda"):
        find_binary("mooncake_master")
    assert "mooncake_master" in (missing_reason() or "")


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("echo 'bad flag' >&2\nexit 3", r"exited with code 3 at start: bad flag"),
        (
            "echo 'error while loading shared libraries: libibverbs.so.1' >&2\nexit 127",
            r"code 127 at start; .*apt-get install -y libibverbs1",
        ),
    ],
)
def test_a_binary_that_dies_at_start_is_reported(tmp_path: Path, script: str, message: str) -> None:
    fake = tmp_path / "mooncake_client"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    holder = MooncakeHolder("127.0.0.1:1", segment_size="1MiB", binary=fake)
    with pytest.raises(MooncakeError, match=message):
        holder.start()
    assert not holder.running


def test_a_holder_needs_a_segment() -> None:
    with pytest.raises(ValueError, match="segment"):
        MooncakeHolder("127.0.0.1:1", segment_size=0)


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_mooncake
def test_cli_commands_run_master_and_holder_until_signalled() -> None:
    port, metrics_port, holder_port = free_port(), free_port(), free_port()
    cli = [sys.executable, "-m", "specforge_cli"]
    env = dict(os.environ, SPECFORGE_LOG_FORMAT="console")
    master = subprocess.Popen(
        [*cli, "mooncake-master", "--port", str(port), "--metrics-port", str(metrics_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    holder = None
    try:
        probe = MooncakeMaster(port=port, metrics_port=metrics_port)  # never started: a reader
        _wait_for(lambda: (probe.health() or {}).get("service_ready"), "the master")
        holder = subprocess.Popen(
            [*cli, "mooncake-holder", "--master", f"127.0.0.1:{port}", "--port",
             str(holder_port), "--segment-size", "32MiB"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        _wait_for(
            lambda: _gauge(probe.metrics(), "master_total_capacity_bytes") == 32 << 20,
            "the holder's segment",
        )
        for proc in (holder, master):
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, out
        assert "running" in out and f"mooncake://127.0.0.1:{port}" in out
    finally:
        for proc in (holder, master):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
