"""Prometheus metrics of a service: its own registry, an HTTP endpoint, updates that never raise.

Each service declares its metrics in a ``ServiceMetrics`` subclass of its own package and updates
them where the work happens; the endpoint is off unless a port is given (``--metrics-port`` or
``SPECFORGE_METRICS_PORT``). It binds ``127.0.0.1`` unless told otherwise (``--metrics-host`` or
``SPECFORGE_METRICS_HOST``; ``0.0.0.0`` inside a container), since nothing listens beyond loopback
unless configured. Port 0 picks a free port; the chosen one is logged ("metrics served").

A per-instance ``CollectorRegistry`` (never the global default) lets several services, or several
tests, live in one process. Metrics are observability, never a reason to fail: a method marked
``@never_raises`` logs its first failure and returns, and an endpoint that cannot bind logs an
error and leaves the service running without one.
"""

from __future__ import annotations

import argparse
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from .log import get_logger

if TYPE_CHECKING:  # imported where used: every command's parser is built by ``specforge status``
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

    from .bus import Bus
    from .lag_metrics import LagSource

DEFAULT_HOST = "127.0.0.1"
PORT_ENV = "SPECFORGE_METRICS_PORT"
HOST_ENV = "SPECFORGE_METRICS_HOST"
LAG_EVERY_S = 5.0

P = ParamSpec("P")
T = TypeVar("T")


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` / ``--metrics-host``, defaulting to the ``SPECFORGE_METRICS_*`` env."""
    env = os.environ.get
    group = parser.add_argument_group("Prometheus metrics (flags override SPECFORGE_METRICS_* env)")
    group.add_argument(
        "--metrics-port",
        type=int,  # applied to the env's string too, so a bad value is a usage error
        default=env(PORT_ENV) or None,
        metavar="PORT",
        help=f"serve Prometheus metrics on this port; 0 picks a free one (env {PORT_ENV}; "
        "default: off)",
    )
    group.add_argument(
        "--metrics-host",
        default=env(HOST_ENV) or DEFAULT_HOST,
        metavar="HOST",
        help=f"address the metrics endpoint binds (env {HOST_ENV}; default {DEFAULT_HOST}, "
        "loopback only)",
    )


@dataclass(frozen=True)
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server (a daemon thread) and the address it bound."""

    host: str
    port: int
    server: WSGIServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def serve_metrics(
    registry: CollectorRegistry, port: int, host: str = DEFAULT_HOST
) -> MetricsEndpoint:
    """Serve ``registry`` on ``host:port`` (port 0: a free one); ``OSError`` if it cannot bind."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry)
    bound_host, bound_port = server.server_address[:2]
    return MetricsEndpoint(str(bound_host), int(bound_port), server, thread)


def never_raises(method: Callable[P, T]) -> Callable[P, T | None]:
    """Mark a ``ServiceMetrics`` update: a failure in it is logged (once) and swallowed, so an
    instrumentation bug can never fail the step it observes."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> T | None:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            owner = args[0]
            assert isinstance(owner, ServiceMetrics)
            owner.failed(method.__name__, exc)
            return None

    return guarded


class ServiceMetrics:
    """Base of a service's metrics: the registry, the bus-lag gauges every service exports, and
    the endpoint serving them. Subclasses declare their own metrics on ``self.registry``."""

    def __init__(self, service: str, run_id: str) -> None:
        from prometheus_client import CollectorRegistry

        from .lag_metrics import LagGauges

        self.service, self.run_id = service, run_id
        self.registry = CollectorRegistry()
        self.lag = LagGauges(self.registry, run_id)
        self.endpoint: MetricsEndpoint | None = None
        self.log = get_logger(service=service, run=run_id)
        self.failures = 0

    def failed(self, what: str, exc: BaseException) -> None:
        """An update that raised: counted, and logged the first time (not once per step)."""
        self.failures += 1
        if self.failures == 1:
            self.log.warning("metrics update failed; the service goes on", update=what,
                             error=repr(exc))  # fmt: skip

    def serve(self, port: int, host: str = DEFAULT_HOST) -> MetricsEndpoint | None:
        """Start the endpoint; None (and an error log) when the address cannot be bound."""
        try:
            self.endpoint = serve_metrics(self.registry, port, host)
        except OSError as exc:
            self.log.error("cannot serve metrics; running without them", host=host, port=port,
                           error=repr(exc))  # fmt: skip
            return None
        self.log.info("metrics served", host=self.endpoint.host, port=self.endpoint.port,
                      url=self.endpoint.url)  # fmt: skip
        return self.endpoint

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    @contextmanager
    def served(
        self, port: int | None, host: str = DEFAULT_HOST
    ) -> Iterator[MetricsEndpoint | None]:
        """Serve during the block when ``port`` is set (None: metrics off)."""
        if port is None:
            yield None
            return
        try:
            yield self.serve(port, host)
        finally:
            self.close()

    @asynccontextmanager
    async def polling_lag(
        self, bus: Bus, sources: Sequence[LagSource], every_s: float = LAG_EVERY_S
    ) -> AsyncIterator[None]:
        """Refresh the lag gauges of ``sources`` every ``every_s`` seconds during the block, and
        once more when it ends, while the endpoint is up (no endpoint: no bus queries)."""
        if self.endpoint is None:
            yield
            return
        async with self.lag.polling(
            bus, sources, every_s, on_error=lambda exc: self.failed("consumer lag", exc)
        ):
            yield
