"""Embedded Mooncake processes: the master and a segment holder, for tests, benches and the CLI.

The ``mooncake-transfer-engine-non-cuda`` wheel (CPU) or ``mooncake-transfer-engine`` (CUDA) puts
``mooncake_master`` and ``mooncake_client`` next to the venv's python; both need the system
library ``libibverbs.so.1`` even for TCP.

The master keeps only metadata (which key lives where). The bytes live in *segments* that
clients mount, and a segment dies with the process that mounted it (the master forgets it ~10 s
later). So a deployment runs a long-lived holder per memory node: ``mooncake_client`` with a
global segment and nothing else to do; capture and trainer processes are pure clients.

Both bind loopback by default. The holder's transfer engine (like every store client's) also
listens on a random port of every interface whatever ``host`` says: firewall it.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .log import get_logger
from .nats_server import terminate

log = get_logger(component="mooncake")

WHEEL = "mooncake-transfer-engine-non-cuda==0.3.13.post1"
WHEEL_HINT = (
    f"install it with `pip install {WHEEL}` (CPU; `make setup` does it) "
    "or `pip install mooncake-transfer-engine` (CUDA)"
)
IBVERBS_HINT = "Mooncake needs libibverbs.so.1 even for TCP: `apt-get install -y libibverbs1`"
DEFAULT_MASTER_PORT = 50051
DEFAULT_METRICS_PORT = 9003
DEFAULT_HOLDER_PORT = 50052
DEFAULT_SEGMENT = "4GiB"
# Port choices retried when another process grabs a port between our probe and the bind.
_START_ATTEMPTS = 3

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


class MooncakeError(RuntimeError):
    """A Mooncake process is missing, could not start, or died."""


def parse_size(value: int | str) -> int:
    """Bytes from ``1073741824``, ``512MiB``, ``4GB``, ``2G`` (K/M/G/T are powers of 1024, as
    Mooncake reads them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size {value} must not be negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"size {value!r} must be bytes or a number with K/M/G/T[i][B]")
    number, unit, _ = match.groups()
    return int(number) << (10 * " KMGT".index(unit.upper() or " "))


def find_binary(name: str) -> Path:
    """A Mooncake binary: next to this interpreter first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found:
        return Path(found)
    raise MooncakeError(f"{name} not found next to the Python interpreter or on PATH; {WHEEL_HINT}")


def missing_reason() -> str | None:
    """Why Mooncake cannot run here (wheel, binaries or libibverbs missing), or None if it can."""
    if importlib.util.find_spec("mooncake") is None:
        return f"the Mooncake wheel is not installed; {WHEEL_HINT}"
    for name in ("mooncake_master", "mooncake_client"):
        try:
            find_binary(name)
        except MooncakeError as exc:
            return str(exc)
    if ctypes.util.find_library("ibverbs") is None:
        try:
            ctypes.CDLL("libibverbs.so.1")
        except OSError:
            return IBVERBS_HINT
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the caller retries if it is taken before the bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _reachable(host: str) -> str:
    """The address to probe a listener bound to ``host`` at (wildcards -> loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class _Child:
    """A Mooncake binary as a child process: free ports, readiness polling, clean stop."""

    binary_name = ""

    def __init__(self, binary: str | Path | None, ready_timeout: float) -> None:
        self.binary = Path(binary) if binary else None
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_file: object | None = None
        self.returncode: int | None = None  # of the last process, once stopped

    # Subclasses: the ports to choose when 0, the command line, and when it is ready.
    def _pick_ports(self) -> list[int]:
        raise NotImplementedError

    def _args(self, binary: Path) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def log_path(self) -> Path | None:
        return None if self._workdir is None else self._workdir / f"{self.binary_name}.log"

    def start(self):  # noqa: ANN201 - returns the subclass
        if self._proc is not None:
            return self
        binary = self.binary or find_binary(self.binary_name)
        self._workdir = Path(tempfile.mkdtemp(prefix=f"specforge-{self.binary_name}-"))
        try:
            attempt = 1
            while True:
                chosen = self._pick_ports()
                if self._launch(binary):
                    log.debug("started", binary=self.binary_name, pid=self.pid)
                    return self
                # Died at start. If a port we chose got taken meanwhile, try fresh ones.
                if attempt == _START_ATTEMPTS or not any(_port_taken(p) for p in chosen):
                    raise self._died()
                attempt += 1
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: Path) -> bool:
        """Start the process and wait until ready (True) or until it exits (False)."""
        assert self.log_path is not None
        env = dict(os.environ)
        env.setdefault("MC_LOG_LEVEL", "WARNING")
        self._reap()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._proc = subprocess.Popen(
            self._args(binary),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(0.02)
        raise MooncakeError(
            f"{self.binary_name} did not become ready within {self.ready_timeout}s; "
            f"log: {self.log_tail()}"
        )

    def log_tail(self) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")[-2000:].strip()

    def _died(self) -> MooncakeError:
        assert self._proc is not None
        tail = self.log_tail()
        hint = f"; {IBVERBS_HINT}" if "libibverbs" in tail else ""
        return MooncakeError(
            f"{self.binary_name} exited with code {self._proc.returncode} at start{hint}: {tail}"
        )

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        self.returncode = None if proc is None else proc.returncode

    def stop(self) -> None:
        """SIGTERM (the holder has no handler: it just ends), SIGKILL after 10 s."""
        self._reap()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MooncakeMaster(_Child):
    """``mooncake_master``: key -> segment metadata and allocation; no data passes through it.

    Ready when ``/health`` on the metrics port says the service is ready. ``port=0`` and
    ``metrics_port=0`` pick free ports. Quiet below WARNING (``-minloglevel=1``).
    """

    binary_name = "mooncake_master"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_port: int = 0,
        binary: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 15.0,
    ) -> None:
        super().__init__(binary, ready_timeout)
        self.host = host
        self.port, self._auto_port = port, port == 0
        self.metrics_port, self._auto_metrics = metrics_port, metrics_port == 0
        self.extra_args = extra_args

    @property
    def address(self) -> str:
        """``host:port`` for clients and holders (``-master_server_address``)."""
        return f"{_reachable(self.host)}:{self.port}"

    @property
    def store_uri(self) -> str:
        return f"mooncake://{self.address}"

    def _pick_ports(self) -> list[int]:
        chosen = []
        if self._auto_port:
            self.port = free_port(_reachable(self.host))
            chosen.append(self.port)
        if self._auto_metrics:
            self.metrics_port = free_port(_reachable(self.host))
            chosen.append(self.metrics_port)
        return chosen

    def _args(self, binary: Path) -> list[str]:
        return [
            str(binary),
            f"-rpc_address={self.host}",
            f"-rpc_port={self.port}",
            f"-metrics_host={self.host}",
            f"-metrics_port={self.metrics_port}",
            "-minloglevel=1",
            *self.extra_args,
        ]

    def health(self) -> dict[str, object] | None:
        """The parsed ``/health`` answer, or None if the admin server does not answer."""
        url = f"http://{_reachable(self.host)}:{self.metrics_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 - loopback
                return json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` (capacity, allocated bytes, key count...)."""
        url = f"http://{_reachable(self.host)}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as response:  # noqa: S310 - loopback
            return response.read().decode()

    def _ready(self) -> bool:
        health = self.health()
        return bool(health and health.get("service_ready"))


class MooncakeHolder(_Child):
    """``mooncake_client`` holding a global segment: the memory samples live in.

    Ready when its RPC port accepts a connection: the binary opens it only after the segment is
    mounted at the master (it binds 127.0.0.1 whatever ``host`` is). ``host`` is the address
    peers use to reach the segment; ``port=0`` picks a free RPC port.
    """

    binary_name = "mooncake_client"

    def __init__(
        self,
        master: str,
        *,
        segment_size: int | str = DEFAULT_SEGMENT,
        host: str = "127.0.0.1",
        port: int = 0,
        protocol: str = "tcp",
        devices: str = "",
        metadata: str = "P2PHANDSHAKE",
        binary: str | Path | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(binary, ready_timeout)
        self.master = master
        self.segment_size = parse_size(segment_size)
        if self.segment_size <= 0:
            raise ValueError("a holder needs a segment size above 0")
        self.host = host
        self.port, self._auto_port = port, port == 0
        self.protocol = protocol
        self.devices = devices
        self.metadata = metadata
        self.extra_args = extra_args

    def _pick_ports(self) -> list[int]:
        if not self._auto_port:
            return []
        self.port = free_port()
        return [self.port]

    def _args(self, binary: Path) -> list[str]:
        args = [
            str(binary),
            f"-host={self.host}",
            f"-global_segment_size={self.segment_size}",
            f"-master_server_address={self.master}",
            f"-metadata_server={self.metadata}",
            f"-protocol={self.protocol}",
            f"-port={self.port}",
        ]
        if self.devices:
            args.append(f"-device_names={self.devices}")
        return [*args, *self.extra_args]

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False
