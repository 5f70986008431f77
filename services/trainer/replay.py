"""``specforge replay --from-run A --run B [--set k=v ...]``: train B on A's recorded samples.

Stores B's run spec = A's spec with ``run_id=B``, the overrides, and ``data_run`` = the run that
owns the samples (A, or A's own ``data_run`` when A is itself a replay), then runs the trainer on
B (what ``specforge train --run B`` does: resumes B if it has checkpoints). The trainer reads the
data run's samples log, enqueue summary and vocab map; A's features must still be in the store.
Re-running the same replay is fine (same spec); a different spec for an existing B is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .command import add_arguments as add_train_arguments
from .command import run_trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-run", required=True, help="the run whose samples to replay")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the copied spec (e.g. train.learning_rate=1e-4); repeatable",
    )
    parser.add_argument(
        "--spec-only", action="store_true", help="store B's spec and exit without training"
    )
    add_train_arguments(parser)  # --run, --device, --threads, --no-resume, bus flags


def main(args: argparse.Namespace) -> int:
    from specforge_common.log import configure_logging

    configure_logging("json")
    code = asyncio.run(_store_spec(args))
    if code != 0 or args.spec_only:
        return code
    return asyncio.run(run_trainer(args))


async def _store_spec(args: argparse.Namespace) -> int:
    import msgspec

    from specforge_common.bus import BusError, RunSpecConflict, bus_config_from_args, open_bus
    from specforge_common.config import ConfigError, build_run_spec
    from specforge_common.log import get_logger

    log = get_logger(service="replay", run=args.run, data_run=args.from_run)
    if args.from_run == args.run:
        print("specforge replay: --from-run and --run must differ", file=sys.stderr)
        return 2
    try:
        bus = await open_bus(bus_config_from_args(args, f"specforge-replay-{args.run}"))
    except BusError as exc:
        print(f"specforge replay: {exc}", file=sys.stderr)
        return 1
    async with bus:
        source = await bus.get_run_spec(args.from_run)
        if source is None:
            print(f"specforge replay: run {args.from_run!r} has no run spec on the bus",
                  file=sys.stderr)  # fmt: skip
            return 1
        data = msgspec.to_builtins(source)
        data |= {"run_id": args.run, "data_run": source.data_run or args.from_run}
        try:
            spec = build_run_spec(data, args.set, env={})
        except (ConfigError, ValueError) as exc:
            print(f"specforge replay: {exc}", file=sys.stderr)
            return 2
        if spec.run_id != args.run or spec.data_run != (source.data_run or args.from_run):
            print("specforge replay: --set may not change run_id or data_run", file=sys.stderr)
            return 2
        await bus.ensure_streams(args.run)
        try:
            await bus.put_run_spec(spec)
        except RunSpecConflict as exc:
            print(f"specforge replay: {exc}", file=sys.stderr)
            return 1
        log.info("replay spec stored", spec_hash=spec.spec_hash(), data_run=spec.data_run,
                 overrides=list(args.set))  # fmt: skip
        print(f"run {args.run}: spec {spec.spec_hash()} replays the samples of {spec.data_run}")
    return 0
