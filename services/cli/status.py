"""``specforge status --run R``: what is queued, stored and pending for a run, from anywhere."""

from __future__ import annotations

import argparse
import asyncio

from specforge_common.bus import BusError, add_bus_arguments, bus_config_from_args, open_bus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run id")
    add_bus_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    from specforge_common.subjects import STREAM_KINDS

    async with await open_bus(bus_config_from_args(args, "specforge-status")) as bus:
        spec = await bus.get_run_spec(args.run)
        print(f"run {args.run}: " + (f"spec {spec.spec_hash()}" if spec else "no run spec stored"))
        for kind in STREAM_KINDS:
            try:
                state = await bus.stream_state(args.run, kind)
            except BusError:
                print(f"  {kind:<12} (no stream)")
                continue
            print(f"  {kind:<12} {state.messages:>8} msgs  {state.bytes:>12,} bytes  "
                  f"seq {state.first_seq}..{state.last_seq}")  # fmt: skip
            for name in await bus.consumers(args.run, kind):
                lag = await bus.consumer_lag(args.run, kind, name)
                print(
                    f"    consumer {name:<16} pending {lag.num_pending:>8}  "
                    f"unacked {lag.num_ack_pending:>6}  redelivered {lag.num_redelivered}"
                )
    return 0
