"""``specforge nats-server``: the pinned JetStream server in the foreground (a dev box, or the
container of the compose stack).

``--config`` passes a nats-server config file (accounts, users, TLS, and JetStream with its
store directory: ``deploy/nats-server.conf``); ``--host``/``--port`` override the file's."""

from __future__ import annotations

import argparse
import signal
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=4222, help="client port (-1: any free one)")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--store-dir", help="JetStream directory (default: a temporary one)")
    store.add_argument(
        "--config", help="nats-server config file (users, permissions, TLS, jetstream.store_dir)"
    )
    parser.add_argument(
        "--monitor-port", type=int, help="HTTP monitoring port (/healthz, /varz); off by default"
    )


def main(args: argparse.Namespace) -> int:
    from specforge_common.log import get_logger
    from specforge_common.nats_server import NatsServer

    log = get_logger(command="nats-server")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    extra: list[str] = []
    if args.monitor_port is not None:
        # Monitoring is unauthenticated: it listens where the clients do, never wider.
        extra += ["-m", str(args.monitor_port)]
    with NatsServer(
        host=args.host,
        port=args.port,
        store_dir=args.store_dir,
        config_file=args.config,
        extra_args=tuple(extra),
    ) as server:
        log.info("nats-server running; Ctrl-C stops it", url=server.url,
                 store_dir=str(server.store_dir or f"from {args.config}"))  # fmt: skip
        while not stop.wait(1.0):
            if not server.running:
                log.error("nats-server exited unexpectedly")
                return 1
    return 0
