"""``specforge mooncake-master`` and ``specforge mooncake-holder``: the processes a
``mooncake://`` feature store needs, in the foreground until Ctrl-C / SIGTERM.

One module serves both commands: ``add_arguments`` tells them apart by the subcommand's name
(the end of ``parser.prog``), ``main`` by ``args.command``.
"""

from __future__ import annotations

import argparse
import signal
import threading

MASTER = "mooncake-master"
HOLDER = "mooncake-holder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    role = parser.prog.rsplit(" ", 1)[-1]
    parser.set_defaults(mooncake_role=role)
    if role == MASTER:
        parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
        parser.add_argument("--port", type=int, default=50051, help="RPC port (0: a free one)")
        parser.add_argument(
            "--metrics-port", type=int, default=9003, help="/health + /metrics port (0: free)"
        )
    else:
        parser.add_argument("--master", default="127.0.0.1:50051", help="master HOST:PORT")
        parser.add_argument(
            "--host", default="127.0.0.1", help="address peers reach this holder at (loopback)"
        )
        parser.add_argument("--port", type=int, default=50052, help="RPC port (0: a free one)")
        parser.add_argument("--segment-size", default="4GiB", help="memory lent to the store")
        parser.add_argument("--protocol", choices=("tcp", "rdma"), default="tcp")
        parser.add_argument("--devices", default="", help="RDMA devices, e.g. mlx5_0,mlx5_1")
        parser.add_argument(
            "--metadata", default="P2PHANDSHAKE", help="metadata server (P2PHANDSHAKE: none)"
        )
    parser.add_argument(
        "--extra-arg",
        action="append",
        default=[],
        metavar="-FLAG=VALUE",
        help="pass a flag to the Mooncake binary as is (repeatable)",
    )


def main(args: argparse.Namespace) -> int:
    from specforge_common.log import get_logger
    from specforge_common.mooncake_processes import MooncakeHolder, MooncakeMaster

    role = getattr(args, "command", None) or args.mooncake_role
    log = get_logger(command=role)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    extra = tuple(args.extra_arg)
    if role == MASTER:
        process: MooncakeMaster | MooncakeHolder = MooncakeMaster(
            host=args.host, port=args.port, metrics_port=args.metrics_port, extra_args=extra
        )
    else:
        process = MooncakeHolder(
            args.master,
            segment_size=args.segment_size,
            host=args.host,
            port=args.port,
            protocol=args.protocol,
            devices=args.devices,
            metadata=args.metadata,
            extra_args=extra,
        )
    with process:
        if isinstance(process, MooncakeMaster):
            log.info("mooncake master running; Ctrl-C stops it", store_uri=process.store_uri,
                     metrics=f"http://{args.host}:{process.metrics_port}/metrics")  # fmt: skip
        else:
            log.info("mooncake segment holder running; Ctrl-C stops it (its data goes with it)",
                     master=args.master, segment_bytes=process.segment_size)  # fmt: skip
        while not stop.wait(1.0):
            if not process.running:
                log.error(f"{role} exited unexpectedly", log_tail=process.log_tail())
                return 1
    return 0
