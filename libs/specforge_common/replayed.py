"""A replayed run (``specforge replay``) owns no samples: its prompts, samples log, enqueue
summary and vocab map are those of its data run (``RunSpec.samples_run``). The evaluator, status
and sweep find that run's spec (its hash stamps the samples, its store holds them) here."""

from __future__ import annotations

import asyncio

from .bus import Bus
from .contracts import RunSpec


async def data_run_spec(
    bus: Bus, spec: RunSpec, *, wait: bool = False, timeout: float | None = None,
    stop: asyncio.Event | None = None,
) -> RunSpec | None:  # fmt: skip
    """The spec of the run whose samples ``spec`` reads: ``spec`` itself, or the replayed run's
    (None when it is not stored; with ``wait``, waiting for it as ``Bus.wait_for_record``)."""
    if spec.samples_run == spec.run_id:
        return spec
    if not wait:
        return await bus.get_run_spec(spec.samples_run)
    return await bus.wait_for_record(spec.samples_run, RunSpec, timeout=timeout, stop=stop,
                                     what=f"run spec of data run {spec.samples_run!r}")  # fmt: skip
