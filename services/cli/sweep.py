"""``specforge sweep --run R [--force]``: free the feature store of a finished run.

A store that holds RAM (``mooncake://``) keeps every sample until someone deletes it: consume-once
training deletes train samples as checkpoints cover them, and this command deletes the rest once
the run is over -- the features of every SampleRef in the run's samples stream (both splits and
re-captured samples) and the vocab map object its enqueue summary names.

A run is finished when its final CheckpointEvent is published and the evaluator has published an
EvalResult for that step (the evaluator reads eval samples until then). ``--force`` sweeps an
unfinished run anyway (its trainer and evaluator then fail on missing features). Sweeping is
idempotent: already-absent samples are counted, not errors. ``--store`` overrides the run spec's
store URI (e.g. when the master is reached by another address from here).

A replayed run (``specforge replay``) owns no features: its samples are its data run's, which
that run and other replays of it may still need. Sweeping it is refused (sweep the data run);
``--force`` sweeps the data run's features, read from the data run's samples stream.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from specforge_common.bus import add_bus_arguments, open_bus


class SweepRefused(RuntimeError):
    """The run is not finished (or unknown) and ``force`` was not given."""


@dataclass
class SweepReport:
    run_id: str
    store_uri: str
    data_run: str = ""  # whose samples were swept, when another run's (a replay's data run)
    removed: dict[str, int] = field(default_factory=dict)  # subject -> samples deleted
    removed_bytes: int = 0
    absent: int = 0  # already gone (consumed, swept before, or evicted)
    failed: int = 0
    vocab_map: str = "none"  # removed | absent | failed | none (the run has no vocab map)
    first_error: str = ""

    def lines(self) -> list[str]:
        removed = ", ".join(f"{n} {what}" for what, n in sorted(self.removed.items())) or "none"
        whose = f" (the samples of run {self.data_run})" if self.data_run else ""
        lines = [
            f"run {self.run_id}: swept {self.store_uri}{whose}",
            f"  removed   {sum(self.removed.values())} samples ({removed}), "
            f"{self.removed_bytes} bytes",
            f"  absent    {self.absent} (already deleted or evicted)",
            f"  vocab map {self.vocab_map}",
        ]
        if self.failed:
            lines.append(f"  FAILED    {self.failed}: {self.first_error}")
        return lines


async def unfinished_reason(bus: Any, run_id: str) -> str | None:
    """Why ``run_id`` is not finished yet, or None when it is (final checkpoint evaluated)."""
    from specforge_common.contracts import CheckpointEvent, EvalResult

    if await bus.get_run_spec(run_id) is None:
        return f"run {run_id!r} has no run spec on this bus"
    finals = [e async for _, e in bus.records(run_id, "checkpoints", CheckpointEvent) if e.final]
    if not finals:
        return f"run {run_id!r} has no final checkpoint yet (the trainer is still running)"
    step = finals[-1].step
    evaluated = {r.step async for _, r in bus.records(run_id, "evals", EvalResult)}
    if step not in evaluated:
        return f"run {run_id!r}: its final checkpoint (step {step}) has no EvalResult yet"
    return None


async def sweep_run(bus: Any, run_id: str, store: Any, *, force: bool = False) -> SweepReport:
    """Delete the run's features from ``store``; SweepRefused if unfinished and not ``force``."""
    import asyncio

    from specforge_common.contracts import EndOfSplit, EnqueueSummary, SampleRef
    from specforge_common.subjects import RunSubjects, enqueue_key

    reason = await unfinished_reason(bus, run_id)
    spec = await bus.get_run_spec(run_id)
    data_run = spec.samples_run if spec is not None else run_id
    if reason is None and data_run != run_id:
        reason = (
            f"run {run_id!r} replays the samples of run {data_run!r}, which that run (and "
            f"any other replay of it) may still need: sweep run {data_run!r} instead"
        )
    if reason is not None and not force:
        raise SweepRefused(f"{reason}; use --force to sweep it anyway")
    subjects = RunSubjects(data_run)
    refs = [
        record
        async for _, record in bus.read_log(
            subjects.stream("samples"), subjects.all_samples, SampleRef | EndOfSplit
        )
        if isinstance(record, SampleRef)
    ]
    summary = await bus.get_record(enqueue_key(data_run), EnqueueSummary)
    vocab_map = summary.vocab_map if summary is not None else None
    report = SweepReport(run_id, store.uri, data_run if data_run != run_id else "")
    await asyncio.to_thread(_delete_all, store, refs, vocab_map, report)
    return report


def _delete_all(store: Any, refs: list[Any], vocab_map: Any, report: SweepReport) -> None:
    """Worker thread: delete every sample (then the vocab map), counting what happened."""
    from specforge_common.featurestore import FeatureStoreError

    def delete(location: Any) -> str:
        try:
            if not store.exists(location):
                return "absent"
            store.delete(location)
        except FeatureStoreError as exc:
            report.first_error = report.first_error or repr(exc)
            report.failed += 1
            return "failed"
        report.removed_bytes += location.nbytes
        return "removed"

    for ref in refs:
        outcome = delete(ref.features)
        if outcome == "removed":
            report.removed[ref.split] = report.removed.get(ref.split, 0) + 1
        elif outcome == "absent":
            report.absent += 1
    if vocab_map is not None:
        report.vocab_map = delete(vocab_map)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the run whose features to delete")
    parser.add_argument("--force", action="store_true",
                        help="sweep even if the run is not finished")  # fmt: skip
    parser.add_argument("--store", help="feature store URI (default: the run spec's store_uri)")
    add_bus_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    import sys

    from specforge_common.bus import bus_config_from_args
    from specforge_common.featurestore import open_store
    from specforge_common.replayed import data_run_spec

    async with await open_bus(bus_config_from_args(args, "specforge-sweep")) as bus:
        spec = await bus.get_run_spec(args.run)
        if spec is None:
            print(f"specforge sweep: run {args.run!r} has no run spec on this bus", file=sys.stderr)
            return 2
        data_spec = await data_run_spec(bus, spec) or spec
        store = open_store(args.store or data_spec.store_uri)
        try:
            report = await sweep_run(bus, args.run, store, force=args.force)
        except SweepRefused as exc:
            print(f"specforge sweep: {exc}", file=sys.stderr)
            return 1
        finally:
            store.close()
    print("\n".join(report.lines()))
    return 1 if report.failed else 0
