"""What a ``mooncake://MASTER_HOST:PORT[?options]`` store URI may say, and its defaults.

Options: ``protocol=tcp|rdma``, ``devices=mlx5_0,mlx5_1`` (RDMA NICs), ``segment=SIZE`` (memory
this process lends; default 0, a pure client: a segment dies with its process), ``namespace=``
(default ``default``; separates stores that share a master), ``host=`` (how peers reach this
process; default loopback for a loopback master, else the address that routes to the master),
``metadata=P2PHANDSHAKE`` (or an etcd/http metadata server), ``pool=SIZE`` (free registered
buffers kept for reuse, default 1 GiB), ``pin=auto|0|1`` (page-locked pool buffers; auto = when
CUDA is available), ``metrics=[HOST:]PORT`` (the master's metrics server, default the master host
and port 9003: where ``used_bytes`` reads how full the store is, for capture's byte
backpressure).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from specforge_common.featurestore import codec
from specforge_common.mooncake_processes import DEFAULT_METRICS_PORT, parse_size

PREFIX = "mooncake://"
DEFAULT_NAMESPACE = "default"
DEFAULT_POOL = 1 << 30
OPTIONS = ("protocol", "devices", "segment", "namespace", "host", "metadata", "pool", "pin",
           "metrics")  # fmt: skip


@dataclass(frozen=True)
class MooncakeOptions:
    """A parsed ``mooncake://`` URI; see the module docstring."""

    master_host: str
    master_port: int
    protocol: str = "tcp"
    devices: str = ""
    segment: int = 0
    namespace: str = DEFAULT_NAMESPACE
    host: str = ""
    metadata: str = "P2PHANDSHAKE"
    pool: int = DEFAULT_POOL
    pin: str = "auto"
    metrics: str = ""  # HOST:PORT of the master's metrics server

    @property
    def master(self) -> str:
        return f"{self.master_host}:{self.master_port}"

    @classmethod
    def parse(cls, uri: str) -> MooncakeOptions:
        """ValueError for anything malformed or unknown, before any connection is tried."""
        if not uri.startswith(PREFIX):
            raise ValueError(f"mooncake store URI {uri!r} must start with {PREFIX}")
        parts = urlsplit(uri)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"mooncake store URI {uri!r}: {exc}") from None
        if not host or not port or parts.path not in ("", "/") or parts.fragment:
            raise ValueError(
                f"mooncake store URI {uri!r} must be mooncake://MASTER_HOST:PORT[?options]"
            )
        fields: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(fields) - set(OPTIONS))
        if unknown:
            raise ValueError(f"mooncake store URI {uri!r}: unknown option(s) {unknown}")
        if fields.setdefault("protocol", "tcp") not in ("tcp", "rdma"):
            raise ValueError(f"mooncake store URI {uri!r}: protocol must be tcp or rdma")
        if fields.setdefault("pin", "auto") not in ("auto", "0", "1"):
            raise ValueError(f"mooncake store URI {uri!r}: pin must be auto, 0 or 1")
        namespace = fields.setdefault("namespace", DEFAULT_NAMESPACE)
        if not codec.SAMPLE_ID_PATTERN.match(namespace) or len(namespace) > 64 or ".." in namespace:
            raise ValueError(f"mooncake store URI {uri!r}: namespace must be 1-64 [A-Za-z0-9._-]")
        for name in ("segment", "pool"):
            if name in fields:
                fields[name] = parse_size(fields[name])
        if "host" not in fields:
            fields["host"] = _local_host_towards(host, port)
        fields["metrics"] = _metrics_address(uri, fields.get("metrics", ""), host)
        return cls(master_host=host, master_port=port, **fields)


def _metrics_address(uri: str, value: str, master_host: str) -> str:
    """``HOST:PORT`` from ``PORT``, ``HOST:PORT`` or nothing (the master's default port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = master_host, port or str(DEFAULT_METRICS_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise ValueError(f"mooncake store URI {uri!r}: metrics must be [HOST:]PORT")
    return f"{host}:{int(port)}"


def _local_host_towards(host: str, port: int) -> str:
    """This machine's address on the route to the master (loopback for a loopback master)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(infos[0][4])  # UDP connect: picks a route, sends nothing
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
