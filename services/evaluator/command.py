"""``specforge evaluate --run R``: the evaluator service (checkpoints -> acceptance -> evals).

``specforge evaluate --draft DIR --target DIR --prompts FILE`` is the standalone mode instead: one
draft judged by real speculative decoding, no bus (``standalone.py``).

Reads the run spec from the bus (waiting up to ``--spec-timeout`` for whoever starts the run to
store it), reads the eval split, then evaluates every CheckpointEvent of the run. A replayed run
(``specforge replay``) is scored on its data run's eval split, from that run's store. Exit codes:
0 done (stopped by SIGTERM/SIGINT, or the final checkpoint evaluated with ``--exit-when-final``),
1 no run spec (or data run spec) within ``--spec-timeout`` or the final checkpoint was
dead-lettered, 2 bad
arguments. ``--metrics-port`` serves the service's Prometheus metrics (``metrics.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from specforge_common.bus import BusError, add_bus_arguments, bus_config_from_args, open_bus
from specforge_common.contracts import RunSpec
from specforge_common.metrics import add_metrics_arguments
from specforge_common.replayed import data_run_spec

from . import standalone


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
    add_metrics_arguments(parser)
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


async def _evaluate(args: argparse.Namespace) -> int:
    import signal

    from specforge_common.log import bind_context, get_logger

    bind_context(service="evaluator", run=args.run)
    log = get_logger()
    async with await open_bus(bus_config_from_args(args, f"specforge-evaluator-{args.run}")) as bus:
        try:
            spec = await bus.wait_for_record(args.run, RunSpec, timeout=args.spec_timeout,
                                             what="run spec")  # fmt: skip
            data_spec = await data_run_spec(bus, spec, wait=True, timeout=args.spec_timeout)
        except BusError as exc:
            log.error("no run spec stored for this run: start the run first (whoever "
                      "enqueues it stores the spec)", error=str(exc))  # fmt: skip
            return 1
        # Heavy imports only once there is work: torch, the models, the feature stores.
        import torch

        from specforge_common.featurestore import open_store
        from specforge_common.progress import ProgressBar
        from specforge_common.tracking import TrackingUnavailable

        from .service import Evaluator

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        await bus.ensure_streams(args.run)
        assert data_spec is not None  # waited for: a timeout raised BusError
        store = open_store(data_spec.store_uri)
        evaluator = Evaluator(
            bus,
            spec,
            store,
            device=device,
            exit_when_final=args.exit_when_final,
            data_spec=data_spec,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, evaluator.stop)
        try:
            with (
                evaluator.metrics.served(args.metrics_port, args.metrics_host),
                ProgressBar("evaluate", evaluator.report.figures),
            ):
                report = await evaluator.run()
        except TrackingUnavailable as exc:
            log.error("evaluator cannot run", error=str(exc))
            print(f"specforge evaluate: {exc}", file=sys.stderr)
            return 1
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
