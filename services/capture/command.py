"""``specforge capture --run R``: a capture worker process.

Waits for the run's RunSpec in the KV bucket, loads the frozen target (``HFTargetEngine``) and
the feature store the spec names, and runs a :class:`CaptureWorker` until SIGTERM/SIGINT (it
finishes and acks the prompts it holds, then exits 0) or, with ``--exit-when-done``, until the
prompt queue is drained and the end-of-split markers are published. Logs are JSON lines on
stderr. ``--metrics-port`` serves its Prometheus metrics (``metrics.py``) while it runs. Exit
status: 0 done or stopped, 1 no spec / no broker / cannot load the target.
"""

from __future__ import annotations

import argparse
import asyncio

from specforge_common.bus import Bus, add_bus_arguments, bus_config_from_args, open_bus
from specforge_common.metrics import add_metrics_arguments

from .names import SERVICE

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run id (its RunSpec must be in the KV)")
    add_bus_arguments(parser)
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="target dtype (default: float32 on CPU, the spec's target.dtype on CUDA)",
    )
    parser.add_argument("--producer-id", default=None, help="worker id (default capture-HOST-PID)")
    parser.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit 0 once the prompt queue is drained and end-of-split is published",
    )
    parser.add_argument(
        "--spec-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the RunSpec before giving up (600)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_metrics_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    import os
    import signal
    import socket

    from specforge_common.bus import BusError
    from specforge_common.contracts import RunSpec
    from specforge_common.log import bind_context, configure_logging, get_logger

    configure_logging("json")
    producer = args.producer_id or f"capture-{socket.gethostname()}-{os.getpid()}"
    bind_context(service=SERVICE, run=args.run, producer=producer)
    log = get_logger()

    stop = asyncio.Event()
    worker = None

    def on_signal(signum: int) -> None:
        log.info("signal received: finishing the current batch", signal=signal.Signals(signum).name)
        stop.set()
        if worker is not None:
            worker.stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    try:
        bus = await open_bus(bus_config_from_args(args, f"specforge-capture-{producer}"))
    except BusError as exc:
        log.error("cannot connect to NATS", error=str(exc))
        return 1
    try:
        try:
            spec = await bus.wait_for_record(args.run, RunSpec, timeout=args.spec_timeout,
                                             what="run spec", stop=stop)  # fmt: skip
        except BusError as exc:
            log.error("no run spec stored for this run: start the run first (whoever "
                      "enqueues it stores the spec)", error=str(exc))  # fmt: skip
            return 1
        if spec is None:  # stopped while waiting
            return 0
        log.info("run spec found", spec_hash=spec.spec_hash(), mode=spec.capture.mode)
        import torch
        from transformers.utils import logging as hf_logging

        from specforge_common.featurestore import open_store
        from specforge_common.progress import ProgressBar
        from specforge_common.targets import HFTargetEngine

        from .worker import CaptureWorker

        # Logs are JSON lines: no progress bars or plain-text notices from transformers.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        log.info("loading target", path=spec.target.path, device=device, dtype=args.dtype)
        try:
            engine = await asyncio.to_thread(HFTargetEngine.for_run, spec, device=device,
                                             dtype=dtype)  # fmt: skip
            store = open_store(spec.store_uri)
        except Exception as exc:
            log.error("cannot load the target or open the feature store", error=repr(exc))
            return 1
        worker = CaptureWorker(
            bus, spec, engine, store, producer_id=producer, exit_when_done=args.exit_when_done
        )
        if stop.is_set():
            worker.stop()
        total = await _prompts_total(bus, args.run)
        with (
            worker.metrics.served(args.metrics_port, args.metrics_host),
            ProgressBar("capture", lambda: worker.stats.figures(total)),
        ):
            await worker.run()
        return 0
    finally:
        await bus.close()


async def _prompts_total(bus: Bus, run_id: str) -> int | None:
    """The run's prompts, if its enqueue is complete (for the progress bar; never fails)."""
    from specforge_common.contracts import EnqueueSummary
    from specforge_common.subjects import enqueue_key

    try:
        summary = await bus.get_record(enqueue_key(run_id), EnqueueSummary)
    except Exception:
        return None
    return None if summary is None else summary.train + summary.eval
