"""The emit stage: a captured forward's samples become durable, then their prompts are acked.

For each forward, in a task of its own fed by a one-slot queue (so it stores, publishes and acks
forward k while forward k+1 runs): store each sample's tensors (the capture method's
``feature_keys``: ``input_ids``, ``loss_mask`` int64 [T], ``aux_hidden_states`` [T, nH] and, for
eagle3, ``hidden_states`` [T, H]; engine dtype, no batch dim), publish the SampleRefs with
``Nats-Msg-Id = sample_id`` and, once every PubAck is in, ack the prompts. A crash anywhere before
the ack means redelivery: the sample id is deterministic, the store keeps the first copy of an id
and JetStream drops the duplicate SampleRef (within its duplicate window), so no sample is lost or
doubled.

A re-captured sample's SampleRef goes to ``sf.<run>.samples.recaptured`` with
``msg_id = recaptured:<sample id>:<attempt>``, never to the split's log, which already has the
original (publishing there again would train it twice).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch

from specforge_common import faults
from specforge_common.batch import feature_keys
from specforge_common.bus import Bus
from specforge_common.contracts import SampleRef
from specforge_common.featurestore import FeatureStore
from specforge_common.subjects import RunSubjects

from .failures import Failures
from .ledger import CaptureStats, Held
from .metrics import CaptureMetrics
from .prepare import Prepared

# Each sample's (aux_hidden_states, hidden_states), its real tokens only, on the CPU.
Features = list[tuple[torch.Tensor, torch.Tensor]]


class Emitter:
    """Stores, publishes and acks the forwards a worker captures, one forward behind it."""

    def __init__(
        self,
        bus: Bus,
        store: FeatureStore,
        *,
        run_id: str,
        spec_hash: str,
        method: str,
        producer_id: str,
        stats: CaptureStats,
        held: Held,
        failures: Failures,
        log: Any,
        progress: Callable[[str], None],
        progress_every: int,
        metrics: CaptureMetrics,
    ) -> None:
        self.bus = bus
        self.store = store
        self.run_id = run_id
        self.method = method
        self.keys = feature_keys(method)
        self.spec_hash = spec_hash
        self.producer_id = producer_id
        self.subjects = RunSubjects(run_id)
        self.stats = stats
        self.held = held
        self.failures = failures
        self.log = log
        self.progress = progress
        self.progress_every = max(1, progress_every)
        self.metrics = metrics
        self._queue: asyncio.Queue[tuple[list[Prepared], Features] | None] = asyncio.Queue(1)

    async def put(self, chunk: list[Prepared], rows: Features) -> None:
        """Hand a captured forward over; waits while the stage is still on the previous one."""
        await self._queue.put((chunk, rows))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Runs the stage during the block; leaving it settles everything already handed over."""
        self._queue = asyncio.Queue(1)  # a fresh one per run: a queue binds to its event loop
        task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            await self._queue.put(None)
            await task

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            chunk, rows = item
            try:
                await self.emit(chunk, rows)
            except Exception as exc:  # a bug here must not wedge the pipeline
                self.log.exception("emit stage failed")
                await self.failures.fail([p.delivery for p in chunk], exc, stage="emit")

    async def emit(self, chunk: list[Prepared], rows: Features) -> None:
        """Store the samples, publish their SampleRefs and, once all are stored, ack."""
        try:
            refs = await asyncio.to_thread(self._store, chunk, rows)
            faults.point("capture.after_store_put")
            published = await self.bus.publish_many(
                (self._subject(p), ref, self._msg_id(p)) for p, ref in zip(chunk, refs, strict=True)
            )
            faults.point("capture.after_publish")
        except Exception as exc:
            await self.failures.fail([p.delivery for p in chunk], exc, stage="store/publish")
            return
        await self._ack(chunk)
        for p, pub in zip(chunk, published, strict=True):
            self.held.release(p.delivery)
            if pub.duplicate:
                self.stats.duplicates += 1
            elif p.task.recapture:
                self.stats.recaptured += 1
            else:
                self.stats.samples_published[p.task.split] += 1
            (self.log.info if p.task.recapture else self.log.debug)(
                "sample re-captured" if p.task.recapture else "sample captured",
                sample_id=p.sample_id,
                prompt_id=p.task.prompt_id,
                split=p.task.split,
                tokens=len(p.input_ids),
                seq=pub.seq,
                duplicate=pub.duplicate,
            )
        self.stats.prompts_captured += len(chunk)
        self.stats.emitted += 1
        if self.stats.emitted % self.progress_every == 0:
            self.progress("capture progress")

    def _subject(self, p: Prepared) -> str:
        return self.subjects.recaptured if p.task.recapture else self.subjects.samples(p.task.split)

    def _msg_id(self, p: Prepared) -> str:
        return f"recaptured:{p.sample_id}:{p.task.attempt}" if p.task.recapture else p.sample_id

    def _store(self, chunk: list[Prepared], rows: Features) -> list[SampleRef]:
        """Worker thread: put every sample of a forward in the store; their SampleRefs."""
        refs: list[SampleRef] = []
        for p, (aux, hidden) in zip(chunk, rows, strict=True):
            ids = torch.tensor(p.input_ids, dtype=torch.int64)
            mask = torch.tensor(p.loss_mask, dtype=torch.int64)
            every = {"input_ids": ids, "loss_mask": mask, "aux_hidden_states": aux,
                     "hidden_states": hidden}  # fmt: skip
            tensors = {key: every[key] for key in self.keys}
            started = time.perf_counter()
            location = self.store.put(p.sample_id, tensors)
            self.metrics.store_write(time.perf_counter() - started)
            self.stats.store_bytes += location.nbytes
            refs.append(
                SampleRef(
                    sample_id=p.sample_id,
                    run_id=self.run_id,
                    prompt_id=p.task.prompt_id,
                    split=p.task.split,
                    producer=self.producer_id,
                    features=location,
                    num_tokens=len(p.input_ids),
                    run_spec_hash=self.spec_hash,
                    method=self.method,
                )
            )
        return refs

    async def _ack(self, chunk: list[Prepared]) -> None:
        """Ack the prompts of a forward whose SampleRefs JetStream has stored."""
        for p in chunk:
            try:
                await p.delivery.ack()
            except Exception as exc:  # redelivered later; the SampleRef dedups
                self.log.warning("ack failed", prompt_id=p.task.prompt_id, error=repr(exc))
