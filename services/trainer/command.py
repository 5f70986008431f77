"""``specforge train --run R``: the trainer service, samples -> draft -> checkpoints.

Reads everything it needs from the bus (run spec, enqueue summary, samples log) and trains to
the end of the data, then prints the final draft directory and exits 0. SIGTERM / SIGINT write
a checkpoint at the current step and exit 0 too. A run with checkpoints resumes exactly from the
latest one (weights, optimizer, RNG, stream position); a run whose latest checkpoint is final is
finished: the command says so and exits 0. ``--no-resume`` trains from scratch instead.

Under ``torchrun --nproc-per-node N specforge train --run R`` (``WORLD_SIZE > 1`` in the
environment) every process is one rank of a data-parallel run: gloo on CPU, nccl on CUDA (each
rank on ``cuda:<LOCAL_RANK>``); see ``specforge_trainer.distributed`` and the trainer loop.
``--fsdp`` shards the draft's parameters and optimizer state over the ranks instead of
replicating them (DDP), for drafts too large to replicate; checkpoints are the same either way,
but a run resumes only under the parallelism it started with.
Spell the run ``--run-id R`` there: torchrun's own parser takes ``--run`` for an abbreviation
of its ``--run-path`` and refuses it as ambiguous. ``--metrics-port`` serves the trainer's
Prometheus metrics (``metrics.py``) from rank 0 only: its numbers are already the ranks' sums.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from specforge_common.bus import add_bus_arguments, bus_config_from_args, open_bus
from specforge_common.metrics import add_metrics_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        "--run-id",
        dest="run",
        required=True,
        help="run id (under torchrun write --run-id: torchrun reads --run as its --run-path)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (auto: cuda when present); bf16 autocast on cuda: train.precision",
    )
    parser.add_argument(
        "--spec-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the run spec to appear on the bus before giving up",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--threads-after-capture", type=int, default=None,
        help="torch CPU threads from the second epoch on, when the samples log is complete and "
        "capture no longer needs its cores (a launcher sharing cores with capture sets it)",
    )  # fmt: skip
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="train from scratch even if the run has checkpoints (they are overwritten)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="multi-rank: shard parameters and optimizer state (FSDP2) instead of DDP",
    )
    add_bus_arguments(parser)
    add_metrics_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from specforge_common.log import configure_logging

    configure_logging("json")
    return asyncio.run(run_trainer(args))


async def run_trainer(args: argparse.Namespace) -> int:
    """The trainer as the command runs it (``replay`` too): its exit status."""
    from contextlib import nullcontext

    import torch

    from specforge_common.bus import BusError
    from specforge_common.log import bind_context, get_logger
    from specforge_common.progress import ProgressBar

    from .distributed import DistEnv, destroy_process_group
    from .loop import Trainer, TrainerError

    env = DistEnv.from_env()
    bind_context(service="trainer", run=args.run)
    log = get_logger()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and env.world_size > 1:
        device = f"cuda:{env.local_rank}"
    name = f"specforge-trainer-{args.run}"
    if env.world_size > 1:
        name += f"-rank{env.rank}"
    try:
        bus = await open_bus(bus_config_from_args(args, name))
    except BusError as exc:
        print(f"specforge train: {exc}", file=sys.stderr)
        return 1
    async with bus:
        try:
            trainer = Trainer(bus, args.run, device=device, spec_timeout=args.spec_timeout,
                              resume=not args.no_resume, rank=env.rank,
                              world_size=env.world_size, local_rank=env.local_rank,
                              parallel="fsdp" if args.fsdp else "ddp",
                              threads_after_capture=args.threads_after_capture)  # fmt: skip
        except TrainerError as exc:
            print(f"specforge train: {exc}", file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, trainer.request_stop)
        bar = ProgressBar("train", trainer.progress_figures) if env.rank == 0 else nullcontext()
        try:
            port = args.metrics_port if env.rank == 0 else None
            with trainer.metrics.served(port, args.metrics_host), bar:
                result = await trainer.run()
        except TrainerError as exc:
            log.error("trainer cannot run", error=str(exc))
            print(f"specforge train: {exc}", file=sys.stderr)
            return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            destroy_process_group()
    if result.already_finished:
        assert result.final is not None
        print(f"run {args.run} is already finished; final draft: {result.final.path}")
        return 0
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    if result.stopped:
        last = result.last_checkpoint
        print(f"stopped at step {result.step}; checkpoint: {last.path if last else None}")
    else:
        assert result.final is not None
        print(f"final draft: {result.final.path}")
    print(
        f"steps {result.step}  samples {result.samples_consumed}  "
        f"samples/s {result.samples_per_s:.2f}  data wait {result.data_wait_fraction:.1%}"
    )
    return 0
