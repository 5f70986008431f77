"""``specforge enqueue --run R [--config run.toml] [--set k=v ...] SOURCE [--limit N]``.

Publishes a dataset (a ``.jsonl`` / ``.json`` file, or ``sharegpt`` for the packaged ShareGPT V3
file) as the run's prompt tasks, then its draft vocab map and enqueue summary. With ``--config``
or ``--set`` it can start a run: the spec is built and stored when the run has none yet; when
one is stored it must be the same spec. Malformed records are reported by line and skipped
(exit 0); usage errors exit 2; a conflicting spec or an unusable dataset exits 1.
"""

from __future__ import annotations

import argparse
import asyncio

from specforge_common.bus import add_bus_arguments, bus_config_from_args, open_bus

SHOWN_SKIPS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a .jsonl or .json dataset file, or 'sharegpt' (the packaged ShareGPT V3 file)",
    )
    parser.add_argument("--run", required=True, help="run id")
    parser.add_argument("--config", help="run config TOML (to start a run that has no spec yet)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run setting, e.g. --set capture.mode=decode (repeatable)",
    )
    parser.add_argument("--limit", type=_positive_int, help="read at most N source records")
    add_bus_arguments(parser)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_enqueue(args))


def _build_spec(args: argparse.Namespace):
    """The spec --config/--set describe, with --run as its run id; None when neither is given."""
    from specforge_common.config import ConfigError, load_run_spec, read_config

    if args.config is None and not args.overrides:
        return None
    if args.config is not None:
        try:
            in_file = read_config(args.config).get("run_id")
        except ConfigError:
            in_file = None  # load_run_spec reports it
        if in_file is not None and in_file != args.run:
            raise _Usage(f"{args.config} is for run {in_file!r}, not --run {args.run!r}")
    return load_run_spec(args.config, [*args.overrides, f'run_id="{args.run}"'])


class _Usage(Exception):
    pass


async def _enqueue(args: argparse.Namespace) -> int:
    from specforge_common.bus import RunSpecConflict
    from specforge_common.config import ConfigError
    from specforge_common.contracts import ContractError, validate_run_id
    from specforge_common.data.enqueue import EnqueueError, enqueue
    from specforge_common.data.sources import read_conversations

    try:
        validate_run_id(args.run)
        read_conversations(args.source)  # a missing or unsupported source fails before anything
        wanted = _build_spec(args)
    except (ContractError, ConfigError, FileNotFoundError, ValueError, _Usage) as exc:
        print(f"specforge enqueue: error: {exc}")
        return 2

    async with await open_bus(bus_config_from_args(args, "specforge-enqueue")) as bus:
        spec = await bus.get_run_spec(args.run)
        if spec is None:
            if wanted is None:
                print(
                    f"specforge enqueue: error: run {args.run!r} has no spec stored; pass "
                    "--config run.toml (and/or --set key=value) to start it"
                )
                return 2
            # Streams first: services that find the spec find its streams (they may not make them).
            await bus.ensure_streams(args.run)
            try:
                spec = await bus.put_run_spec(wanted)
            except RunSpecConflict as exc:
                print(f"specforge enqueue: {exc}")
                return 1
            print(f"run {args.run}: stored a new run spec {spec.spec_hash()}")
        elif wanted is not None and wanted.spec_hash() != spec.spec_hash():
            conflict = RunSpecConflict(
                f"run {args.run!r} already has a different spec (hash {spec.spec_hash()} vs "
                f"{wanted.spec_hash()} from --config/--set); drop them to use the stored spec, "
                "or choose a new run id"
            )
            print(f"specforge enqueue: {conflict}")
            return 1
        elif wanted is not None and wanted.tracking != spec.tracking:
            # not part of the spec hash, so not a conflict: but not applied either
            print(
                f"run {args.run}: tracking is the stored spec's (backend "
                f"{spec.tracking.backend!r}); --config/--set tracking applies to a new run"
            )
        await bus.ensure_streams(args.run)
        try:
            report = await enqueue(bus, spec, args.source, limit=args.limit)
        except EnqueueError as exc:
            print(f"specforge enqueue: {exc}")
            return 1
    _print_report(report, spec.spec_hash())
    return 0


def _print_report(report, spec_hash: str) -> None:
    print(
        f"run {report.run_id}: enqueued {report.source} (spec {spec_hash}) "
        f"in {report.seconds:.1f} s"
    )
    print(f"  records read     {report.records}")
    print(f"  published        {report.published} new")
    print(f"  duplicates       {report.duplicates} already in the queue (dedup window)")
    print(f"  train / eval     {report.train} / {report.eval}")
    print(f"  skipped          {len(report.skipped)}")
    for bad in report.skipped[:SHOWN_SKIPS]:
        print(f"    line {bad.line}: {bad.reason}")
    if len(report.skipped) > SHOWN_SKIPS:
        print(f"    ... and {len(report.skipped) - SHOWN_SKIPS} more")
    if report.truncated_rows:
        print(f"  truncated        {report.truncated_rows} prompts cut to max_length "
              f"(the longest lost {report.longest_cut} tokens)")  # fmt: skip
    if report.truncated_source:
        print(f"  source truncated {report.truncation}")
    state = "new" if report.summary_written else "kept from the first enqueue of this run"
    print(f"  vocab map        {report.vocab_map_hash} ({state})")
