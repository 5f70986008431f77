"""``specforge evaluate --run R``: the evaluator service (checkpoints -> acceptance -> evals).

``specforge evaluate --draft DIR --target DIR --prompts FILE`` is the standalone mode instead: one
draft judged by real speculative decoding, no bus (``standalone.py``).

Reads the run spec from the bus (waiting up to ``--spec-timeout`` for whoever starts the run to
store it), reads the eval split, then evaluates every CheckpointEvent of the run. Exit codes:
0 done (stopped by SIGTERM/SIGINT, or the final checkpoint evaluated with ``--exit-when-final``),
1 the final checkpoint was dead-lettered, 2 no run spec / cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from specforge_common.cli import add_bus_arguments, bus_config_from_args

from . import standalone

if TYPE_CHECKING:
    from specforge_common.bus import Bus
    from specforge_common.contracts import RunSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run id (the service); or the standalone flags below")
    parser.add_argument(
        "--device", default="auto", help="torch device for the draft (default: cuda if present)"
    )
    parser.add_argument(
        "--exit-when-final",
        action="store_true",
        help="exit after the checkpoint event with final=True is evaluated",
    )
    parser.add_argument(
        "--spec-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the run spec to appear on the bus (default 300)",
    )
    add_bus_arguments(parser)
    standalone.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from specforge_common.log import configure_logging

    if standalone.is_standalone(args):
        configure_logging("console")
        return standalone.main(args)
    if not args.run:
        print("specforge evaluate: give --run R (the service) or --draft/--target/--prompts")
        return 2
    configure_logging("json")
    return asyncio.run(_evaluate(args))


class NoRunSpec(RuntimeError):
    pass


async def wait_for_run_spec(
    bus: Bus, run_id: str, *, timeout: float | None, poll: float = 1.0, log_every: float = 10.0
) -> RunSpec:
    """The run's spec from the KV bucket, waiting (with a log line) while nobody stored it."""
    from specforge_common.log import get_logger

    log = get_logger()
    loop = asyncio.get_running_loop()
    start = loop.time()
    last_log = -log_every
    while (spec := await bus.get_run_spec(run_id)) is None:
        waited = loop.time() - start
        if timeout is not None and waited >= timeout:
            raise NoRunSpec(
                f"no run spec for run {run_id!r} after {timeout:g}s; start the run first "
                "(whoever enqueues it stores the spec)"
            )
        if waited - last_log >= log_every:
            log.info("waiting for the run spec", waited_s=round(waited, 1))
            last_log = waited
        await asyncio.sleep(min(poll, max(timeout - waited, 0.05)) if timeout else poll)
    return spec


async def _evaluate(args: argparse.Namespace) -> int:
    import signal

    from specforge_common.bus import Bus
    from specforge_common.log import bind_context, get_logger

    bind_context(service="evaluator", run=args.run)
    log = get_logger()
    async with await Bus.connect(
        bus_config_from_args(args, f"specforge-evaluator-{args.run}")
    ) as bus:
        try:
            spec = await wait_for_run_spec(bus, args.run, timeout=args.spec_timeout)
        except NoRunSpec as exc:
            log.error("cannot start", error=str(exc))
            return 2
        # Heavy imports only once there is work: torch, the models, the feature stores.
        import torch

        from specforge_common.featurestore import open_store

        from .service import Evaluator

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        await bus.ensure_streams(args.run)
        store = open_store(spec.store_uri)
        evaluator = Evaluator(
            bus,
            spec,
            store,
            target_dir=spec.target.path,
            device=device,
            exit_when_final=args.exit_when_final,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, evaluator.stop)
        try:
            report = await evaluator.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            store.close()
    log.info(
        "evaluator done",
        evaluated=report.evaluated,
        dead_lettered=report.dead_lettered,
        final_step=report.final_step,
    )
    if report.final_step is not None and not report.final_evaluated:
        return 1
    return 0
