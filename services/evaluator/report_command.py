"""``specforge report --run R``: the results page of a run (HTML, markdown summary, PNG plots).

Reads the run's CheckpointEvents and EvalResults from the bus and the trainer's
``<output_dir>/<run>/train_metrics.jsonl`` if present, and writes ``index.html``,
``summary.md`` and plots to ``--out`` (default ``<output_dir>/<run>/report/``). Exit codes:
0 written, 1 the bus could not be read, 2 usage (bad run id, no spec and no ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from specforge_common.bus import add_bus_arguments, bus_config_from_args, open_bus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument(
        "--out", type=Path, help="report directory (default: <output_dir>/<run>/report/)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="the run's output root on this machine (default: the spec's output_dir); "
        "train metrics are read from <output-dir>/<run>/train_metrics.jsonl",
    )
    add_bus_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_report(args))


async def _report(args: argparse.Namespace) -> int:
    from specforge_common.bus import BusError
    from specforge_common.contracts import ContractError, validate_run_id

    from .report import NoReportDir, write_report

    try:
        validate_run_id(args.run)
    except (ContractError, ValueError) as exc:
        print(f"specforge report: error: {exc}")
        return 2
    try:
        async with await open_bus(bus_config_from_args(args, "specforge-report")) as bus:
            report = await write_report(bus, args.run, args.out, output_dir=args.output_dir)
    except NoReportDir as exc:
        print(f"specforge report: error: {exc} (--out DIR or --output-dir DIR)")
        return 2
    except (BusError, ContractError) as exc:
        print(f"specforge report: {exc}")
        return 1
    print(f"run {args.run}: report written to {report.out_dir}")
    print(f"  page     {report.html}")
    print(f"  summary  {report.markdown}")
    for plot in report.plots:
        print(f"  plot     {plot}")
    if report.best_step is not None:
        print(f"  best     step {report.best_step} (by {report.best_metric})")
    return 0
