"""``specforge status --run R``: what is queued, stored and pending for a run, from anywhere.

A replayed run owns no prompts or samples: those lines show its data run's streams."""

from __future__ import annotations

import argparse
import asyncio

from specforge_common.bus import (
    Bus,
    BusError,
    add_bus_arguments,
    bus_config_from_args,
    open_bus,
)

DATA_KINDS = ("prompts", "samples", "promptlog")  # a replayed run's are its data run's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run id")
    add_bus_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    async with await open_bus(bus_config_from_args(args, "specforge-status")) as bus:
        for line in await status_lines(bus, args.run):
            print(line)
    return 0


async def status_lines(bus: Bus, run_id: str) -> list[str]:
    """The status report of ``run_id``, one line per stream and consumer."""
    from specforge_common.subjects import STREAM_KINDS

    spec = await bus.get_run_spec(run_id)
    data_run = spec.samples_run if spec is not None else run_id
    head = f"run {run_id}: " + (f"spec {spec.spec_hash()}" if spec else "no run spec stored")
    lines = [head + (f", replays the samples of run {data_run}" if data_run != run_id else "")]
    for kind in STREAM_KINDS:
        owner = data_run if kind in DATA_KINDS else run_id
        label = kind if owner == run_id else f"{kind} ({owner})"
        try:
            state = await bus.stream_state(owner, kind)
        except BusError:
            lines.append(f"  {label:<12} (no stream)")
            continue
        lines.append(f"  {label:<12} {state.messages:>8} msgs  {state.bytes:>12,} bytes  "
                     f"seq {state.first_seq}..{state.last_seq}")  # fmt: skip
        for name in await bus.consumers(owner, kind):
            lag = await bus.consumer_lag(owner, kind, name)
            lines.append(
                f"    consumer {name:<16} pending {lag.num_pending:>8}  "
                f"unacked {lag.num_ack_pending:>6}  redelivered {lag.num_redelivered}"
            )
    return lines
