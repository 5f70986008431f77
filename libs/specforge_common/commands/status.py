"""``specforge status --run R``: what is queued, stored and pending for a run, from anywhere."""

from __future__ import annotations

import argparse
import asyncio

from ..cli import add_bus_arguments, bus_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run id")
    add_bus_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    import nats.js.errors

    from ..bus import Bus
    from ..subjects import STREAM_KINDS, RunSubjects

    subjects = RunSubjects(args.run)
    async with await Bus.connect(bus_config_from_args(args, "specforge-status")) as bus:
        spec = await bus.get_run_spec(args.run)
        print(f"run {args.run}: " + (f"spec {spec.spec_hash()}" if spec else "no run spec stored"))
        for kind in STREAM_KINDS:
            try:
                info = await bus.js.stream_info(subjects.stream(kind))
            except nats.js.errors.NotFoundError:
                print(f"  {kind:<12} (no stream)")
                continue
            state = info.state
            print(f"  {kind:<12} {state.messages:>8} msgs  {state.bytes:>12,} bytes  "
                  f"seq {state.first_seq}..{state.last_seq}")  # fmt: skip
            for name in await _consumer_names(bus, subjects.stream(kind)):
                lag = await bus.consumer_lag(args.run, kind, name)
                print(
                    f"    consumer {name:<16} pending {lag.num_pending:>8}  "
                    f"unacked {lag.num_ack_pending:>6}  redelivered {lag.num_redelivered}"
                )
    return 0


async def _consumer_names(bus, stream: str) -> list[str]:
    infos = await bus.js.consumers_info(stream)
    return sorted(info.name for info in infos if info.config.durable_name)
