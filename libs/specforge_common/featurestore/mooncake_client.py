"""The boundary with the Mooncake wheel: load it, connect a client, name its status codes, keep
calls off a closed client, and read the master's metrics.

The wheel is imported only when a ``mooncake://`` store is opened, so machines without it can
use the other stores.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.error
import urllib.request
from typing import Any

from specforge_common.featurestore.errors import FeatureStoreError
from specforge_common.featurestore.mooncake_uri import MooncakeOptions
from specforge_common.mooncake_processes import IBVERBS_HINT, WHEEL_HINT

# Staging memory for Mooncake's copying calls, which this backend never makes.
LOCAL_BUFFER = 16 << 20
# Mooncake itself retries an absent master for ~90 s before giving up.
MASTER_PROBE_TIMEOUT = 3.0

# Mooncake status codes (ErrorCode in mooncake-store types.h) that this backend tells apart.
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
LEASE_EXPIRED = -707
_CODE_NAMES = {
    NO_AVAILABLE_HANDLE: "NO_AVAILABLE_HANDLE: no segment has room (start a holder or add one)",
    INVALID_PARAMS: "INVALID_PARAMS",
    REPLICA_IS_NOT_READY: "REPLICA_IS_NOT_READY: a put of this key is still in flight",
    OBJECT_NOT_FOUND: "OBJECT_NOT_FOUND",
    OBJECT_ALREADY_EXISTS: "OBJECT_ALREADY_EXISTS",
    LEASE_EXPIRED: "LEASE_EXPIRED: the read outlived its lease; retry",
    -800: "TRANSFER_FAIL",
    -900: "RPC_FAIL",
    -901: "RPC_TIMEOUT",
}

# The master's gauge of bytes allocated in all segments (every namespace, every client).
ALLOCATED_METRIC = "master_allocated_bytes"
METRICS_TIMEOUT = 2.0


class MooncakeUnavailableError(FeatureStoreError):
    """The Mooncake wheel or its system library (libibverbs) is missing on this machine."""


def status(code: int) -> str:
    """A Mooncake status code as text for an error message."""
    return f"{_CODE_NAMES.get(code, 'error')} ({code})"


def load_client_class() -> type:
    """``MooncakeDistributedStore``, imported only when a mooncake:// store is opened."""
    # Read once, when the library loads: without it every client logs at INFO to stderr.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as exc:
        hint = IBVERBS_HINT if "libibverbs" in str(exc) else WHEEL_HINT
        raise MooncakeUnavailableError(f"cannot use mooncake:// stores: {exc}; {hint}") from None
    return MooncakeDistributedStore


def connect(options: MooncakeOptions) -> Any:
    """A client set up against the master ``options`` names; fails fast if nothing answers."""
    client_class = load_client_class()
    try:
        socket.create_connection(
            (options.master_host, options.master_port), timeout=MASTER_PROBE_TIMEOUT
        ).close()
    except OSError as exc:
        raise FeatureStoreError(
            f"no Mooncake master answers at {options.master} ({exc}); start one with "
            "`specforge mooncake-master` and a segment holder with `specforge mooncake-holder`"
        ) from None
    client = client_class()
    code = client.setup(
        options.host,
        options.metadata,
        options.segment,
        LOCAL_BUFFER,
        options.protocol,
        options.devices,
        options.master,
    )
    if code != 0:
        raise FeatureStoreError(
            f"cannot connect to the Mooncake master at {options.master} as {options.host} "
            f"({options.protocol}): setup returned {code}"
        )
    return client


class ClientGate:
    """Counts calls in flight so ``close`` waits for them: a call on a closed client segfaults
    (seen with 0.3.13), so none may start after ``close`` or still run during it."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._cond = threading.Condition()
        self._active = 0
        self.closed = False

    def __enter__(self) -> None:
        with self._cond:
            if self.closed:
                raise FeatureStoreError(f"feature store {self._uri} is closed")
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def close(self) -> bool:
        """Refuse new calls, wait for those in flight; False if already closed."""
        with self._cond:
            if self.closed:
                return False
            self.closed = True
            self._cond.wait_for(lambda: not self._active)
            return True


def allocated_bytes(metrics_text: str) -> int | None:
    """The ``master_allocated_bytes`` gauge of a master's Prometheus text, or None if absent."""
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name == ALLOCATED_METRIC:
            return int(float(value))
    return None


def read_allocated_bytes(metrics_address: str) -> int | None:
    """``allocated_bytes`` of the metrics server at ``HOST:PORT``; None if it does not answer."""
    url = f"http://{metrics_address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as response:  # noqa: S310
            return allocated_bytes(response.read().decode())
    except (OSError, urllib.error.URLError, ValueError):
        return None
