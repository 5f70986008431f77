"""``specforge nats-server``: a JetStream server for a dev box, in the foreground."""

from __future__ import annotations

import argparse
import signal
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=4222, help="client port (-1: any free one)")
    parser.add_argument("--store-dir", help="JetStream directory (default: a temporary one)")


def main(args: argparse.Namespace) -> int:
    from specforge_common.log import get_logger
    from specforge_common.nats_server import NatsServer

    log = get_logger(command="nats-server")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with NatsServer(host=args.host, port=args.port, store_dir=args.store_dir) as server:
        log.info("nats-server running; Ctrl-C stops it", url=server.url,
                 store_dir=str(server.store_dir))  # fmt: skip
        while not stop.wait(1.0):
            if not server.running:
                log.error("nats-server exited unexpectedly")
                return 1
    return 0
