"""The capture loop: PromptTasks -> frozen target -> features in the store + SampleRefs.

One pass of the loop:

1. ``BackpressureGate.wait()`` (pause while the trainers are too far behind or the store is too
   full, see ``backpressure``).
2. Fetch up to ``capture.batch_size`` PromptTasks from the shared durable consumer "capture".
3. Prepare each task (``prepare``): check run id and spec hash, then prefill (the task's ids and
   loss mask) or decode (the target writes the reply first). A task that can never succeed is
   dead-lettered with the reason; the rest of the batch goes on.
4. Pack the prepared samples, longest first, into right-padded forwards of at most
   ``batch_size`` rows and ``max_batch_tokens`` padded tokens (rows x longest row); a single
   sample longer than the budget is forwarded alone.
5. Per forward: ``engine.capture`` in a worker thread, which also copies each sample's real
   tokens' features to the CPU. Meanwhile the ack heartbeat keeps calling ``in_progress()`` on
   every delivery still held, every ``ack_wait / 3`` seconds.
6. The emit stage (``emit``) stores the samples, publishes their SampleRefs and acks the prompts
   of forward k while forward k+1 runs. Stopping (SIGTERM) drains it first: everything already
   captured is acked.

A multi-row forward that fails is first retried row by row, so one poison sample cannot take its
batch mates down with it; a prompt that still fails is naked with backoff and dead-lettered after
``max_deliver`` deliveries (``failures``). When a fetch comes back empty, ``end_of_data`` decides
whether every prompt is captured, publishes the end-of-split markers and says when the worker
may leave.

Re-capture: a trainer that finds a sample's features missing (evicted from the store) sends its
prompt again, with ``recapture=True``, to ``sf.<run>.prompts.recapture``, which a second durable
consumer ("recapture") reads. A task of its own (serialized with the main loop on the target)
serves it *without* passing the backpressure gate: the trainer waiting for that sample is what
holds the backlog up, so gating it would deadlock. The sample is captured as usual (the store
writes it, its key being gone) and announced on ``sf.<run>.samples.recaptured``; it counts
neither in the EndOfSplit markers nor toward the end of data.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from specforge_common import faults
from specforge_common.bus import Bus, Delivery, WorkConsumer, heartbeat
from specforge_common.contracts import PromptTask, RunSpec
from specforge_common.featurestore import FeatureStore
from specforge_common.lag_metrics import LagSource
from specforge_common.log import get_logger
from specforge_common.subjects import RunSubjects
from specforge_common.targets import TargetEngine, check_engine_layers

from .backpressure import BackpressureGate
from .decode import Decoder
from .emit import Emitter, Features
from .end_of_data import EndOfData
from .failures import Failures
from .ledger import CaptureStats, Held
from .metrics import CaptureMetrics
from .names import DURABLE, RECAPTURE_DURABLE, SERVICE
from .prepare import (
    Prepared,
    Rejected,
    check_supervised,
    check_task,
    pack,
    prefill,
    right_padded,
    sample_id_for,
)


class CaptureWorker:
    """One capture worker; any number of them share the run's prompt queue."""

    def __init__(
        self,
        bus: Bus,
        spec: RunSpec,
        engine: TargetEngine,
        store: FeatureStore,
        *,
        producer_id: str,
        exit_when_done: bool = False,
        ack_wait_s: float | None = None,
        fetch_timeout_s: float = 1.0,
        backoff_s: tuple[float, float] = (1.0, 30.0),
        progress_every: int = 10,
        backpressure_poll_s: float = 1.0,
        tokenizer: Any = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.engine = engine
        self.store = store
        self.producer_id = producer_id
        self.exit_when_done = exit_when_done
        self.ack_wait_s = ack_wait_s
        self.fetch_timeout_s = fetch_timeout_s
        self.run_id = spec.run_id
        self.spec_hash = spec.spec_hash()
        check_engine_layers(spec, engine)
        self.subjects = RunSubjects(self.run_id)
        self.stats = CaptureStats()
        # Always kept (cheap); served only when the command is given a metrics port.
        self.metrics = CaptureMetrics(self.run_id)
        self.log = get_logger(service=SERVICE, run=self.run_id, producer=producer_id)
        capture = spec.capture
        self.gate = BackpressureGate(
            bus,
            self.run_id,
            high_water=capture.high_water_samples,
            low_water=capture.low_water_samples,
            store=store,
            high_water_bytes=capture.high_water_bytes,
            low_water_bytes=capture.low_water_bytes,
            poll_s=backpressure_poll_s,
            log=self.log,
        )
        self.held = Held()
        self.failures = Failures(
            bus, self.run_id, self.spec_hash, stats=self.stats, held=self.held, log=self.log,
            backoff_s=backoff_s, max_deliver=bus.config.max_deliver,
        )  # fmt: skip
        self.emitter = Emitter(
            bus, store, run_id=self.run_id, spec_hash=self.spec_hash,
            method=spec.capture_method, producer_id=producer_id, stats=self.stats,
            held=self.held, failures=self.failures, log=self.log,
            progress=self._log_progress, progress_every=progress_every, metrics=self.metrics,
        )  # fmt: skip
        self.decoder = Decoder(spec, engine, failures=self.failures, stats=self.stats,
                               metrics=self.metrics, tokenizer=tokenizer)  # fmt: skip
        self.end = EndOfData(
            bus, run_id=self.run_id, spec_hash=self.spec_hash, producer_id=producer_id,
            stats=self.stats, log=self.log, progress=self._log_progress,
        )  # fmt: skip
        self._stop = asyncio.Event()
        self._ack_wait = ack_wait_s or bus.config.ack_wait_s
        self._pad_id = engine.info.pad_token_id or 0
        self._started = time.monotonic()
        self._target_lock = asyncio.Lock()  # main loop and re-captures take turns on the target

    def stop(self) -> None:
        """Finish the prompts already fetched (ack them), then return from ``run``."""
        self._stop.set()

    async def run(self) -> CaptureStats:
        await self.bus.ensure_streams(self.run_id)
        consumer: WorkConsumer[PromptTask] = await self.bus.work_consumer(
            self.run_id, "prompts", DURABLE, PromptTask, service=SERVICE,
            ack_wait_s=self.ack_wait_s,
        )  # fmt: skip
        recaptures: WorkConsumer[PromptTask] = await self.bus.work_consumer(
            self.run_id, "prompts", RECAPTURE_DURABLE, PromptTask, service=SERVICE,
            filter_subject=self.subjects.recapture_prompts, ack_wait_s=self.ack_wait_s,
        )  # fmt: skip
        # The consumer may predate this worker (another worker made it): use its settings.
        settings = await self.bus.consumer_lag(self.run_id, "prompts", DURABLE)
        self._ack_wait = settings.ack_wait_s or self._ack_wait
        self.failures.max_deliver = settings.max_deliver or self.failures.max_deliver
        capture = self.spec.capture
        if capture.mode == "decode":
            # A missing tokenizer is a setup error: fail now, not on every prompt.
            _ = self.decoder.tokenizer
        self._started = time.monotonic()
        self.metrics.watch(self.stats)
        self.log.info(
            "capture worker started",
            mode=capture.mode,
            batch_size=capture.batch_size,
            max_batch_tokens=capture.max_batch_tokens,
            ack_wait_s=self._ack_wait,
            max_deliver=self.failures.max_deliver,
            spec_hash=self.spec_hash,
            device=str(self.engine.device),
            dtype=str(self.engine.dtype).removeprefix("torch."),
        )
        lag = [
            LagSource(self.run_id, "prompts", DURABLE),
            LagSource(self.run_id, "prompts", RECAPTURE_DURABLE),
        ]
        async with self.metrics.polling_lag(self.bus, lag):  # refreshed after the last acks
            try:
                async with (
                    heartbeat(self.held, self._ack_wait),
                    self.failures.dead_lettering_given_up(),
                    self.emitter.running(),  # left first: settles what was captured
                ):
                    leaving = asyncio.Event()
                    recapturer = asyncio.create_task(self._serve_recaptures(recaptures, leaving))
                    try:
                        await self._serve_prompts(consumer)
                    finally:
                        leaving.set()
                        await recapturer  # returns within one fetch timeout (plus its batch)
                        await recaptures.close()
            finally:
                try:
                    await self.bus.flush()  # acks are fire-and-forget: get them out before exit
                except Exception as exc:
                    self.log.warning("cannot flush the last acks", error=repr(exc))
                await consumer.close()
                self._log_progress("capture worker stopped")
        return self.stats

    async def _serve_prompts(self, consumer: WorkConsumer[PromptTask]) -> None:
        """The main loop; returns once stopped, or done with ``exit_when_done``."""
        capture = self.spec.capture
        while not self._stop.is_set():
            if not await self.gate.wait(self._stop):
                return
            try:
                deliveries = await consumer.fetch(capture.batch_size, self.fetch_timeout_s)
            except Exception as exc:  # a broker hiccup must not kill the worker
                self.log.warning("fetch failed; retrying", error=repr(exc))
                await self._sleep(1.0)
                continue
            if deliveries:
                async with self._target_lock:
                    await self._process(deliveries)
                continue
            self.stats.empty_fetches += 1
            if (
                await self.end.reached(self.failures.max_deliver)
                and self.exit_when_done
                and await self.end.trainers_done()
            ):
                return

    async def _serve_recaptures(
        self, consumer: WorkConsumer[PromptTask], leaving: asyncio.Event
    ) -> None:
        """Capture the prompts trainers ask for again, also while the gate pauses the main loop."""
        while not (leaving.is_set() or self._stop.is_set()):
            try:
                deliveries = await consumer.fetch(self.spec.capture.batch_size,
                                                  self.fetch_timeout_s)  # fmt: skip
                if deliveries:
                    async with self._target_lock:
                        await self._process(deliveries)
            except Exception as exc:  # a broker hiccup must not end re-capture for good
                self.log.warning("re-capture failed; retrying", error=repr(exc))
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # --- one fetched group -----------------------------------------------------------------

    async def _process(self, deliveries: list[Delivery[PromptTask]]) -> None:
        self.held.hold(deliveries)
        prepared = await self._prepare_all(deliveries)
        captured = [p for p in prepared if p.features is not None]  # decode mode: already done
        if captured:
            self.stats.tokens += sum(len(p.input_ids) for p in captured)
            await self.emitter.put(captured, [p.features for p in captured])
        capture = self.spec.capture
        for chunk in pack(
            [p for p in prepared if p.features is None],
            batch_size=capture.batch_size, max_batch_tokens=capture.max_batch_tokens,
        ):  # fmt: skip
            await self._forward(chunk)

    async def _prepare_all(self, deliveries: list[Delivery[PromptTask]]) -> list[Prepared]:
        checked: list[Delivery[PromptTask]] = []
        for delivery in deliveries:
            try:
                check_task(delivery.record, self.run_id, self.spec_hash)
            except Rejected as exc:
                await self.failures.reject(delivery, str(exc))
                continue
            checked.append(delivery)
        candidates: list[Prepared] = []
        if self.spec.capture.mode == "decode":
            for delivery, ids, mask, features in await self.decoder.write_replies(checked):
                candidates.append(self._prepared(delivery, ids, mask, features))
        else:
            vocab_size = self.engine.info.vocab_size
            for delivery in checked:
                try:
                    ids, mask = prefill(delivery.record, self.spec, vocab_size)
                except Rejected as exc:
                    await self.failures.reject(delivery, str(exc))
                    continue
                candidates.append(self._prepared(delivery, ids, mask))
        ready = []
        for item in candidates:
            try:
                check_supervised(
                    item.task, item.input_ids, item.loss_mask, self.spec.min_loss_tokens
                )
            except Rejected as exc:
                await self.failures.reject(item.delivery, str(exc))
                continue
            ready.append(item)
        return ready

    def _prepared(
        self, delivery: Delivery[PromptTask], ids: list[int], mask: list[int],
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Prepared:  # fmt: skip
        task = delivery.record
        sample_id = sample_id_for(self.run_id, task.prompt_id, self.spec_hash)
        return Prepared(delivery, task, sample_id, ids, mask, features)

    # --- capturing one forward -------------------------------------------------------------

    async def _forward(self, chunk: list[Prepared]) -> None:
        """Run one right-padded forward, then hand its features to the emit stage."""
        try:
            ids, mask = right_padded([p.input_ids for p in chunk], self._pad_id)
            started = time.perf_counter()
            rows = await asyncio.to_thread(self._features, chunk, ids, mask)
            seconds = time.perf_counter() - started
            self.stats.forward_s += seconds
            self.metrics.forward(seconds, mode="prefill")
        except Exception as exc:
            if len(chunk) > 1:
                self.log.warning(
                    "forward of a batch failed; retrying its samples one by one",
                    rows=len(chunk),
                    error=repr(exc),
                )
                for item in chunk:
                    await self._forward([item])
                return
            await self.failures.fail([chunk[0].delivery], exc, stage="forward")
            return
        faults.point("capture.mid_batch")  # features computed, nothing stored or acked
        self.stats.forwards += 1
        self.stats.tokens += sum(len(p.input_ids) for p in chunk)
        self.stats.padded_tokens += ids.numel()
        await self.emitter.put(chunk, rows)  # blocks while the emit stage is behind

    def _features(self, chunk: list[Prepared], ids: torch.Tensor, mask: torch.Tensor) -> Features:
        """Worker thread: the forward and each sample's real-token features, on the CPU."""
        out = self.engine.capture(ids, mask)
        rows = []
        for row, p in enumerate(chunk):
            n = len(p.input_ids)
            rows.append(
                (_owned(out.aux_hidden_states[row, :n]), _owned(out.hidden_states[row, :n]))
            )
        return rows

    def _log_progress(self, event: str) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        stats = self.stats
        self.log.info(
            event,
            **stats.as_log(),
            tokens_per_s=round(stats.tokens / elapsed, 1),
            forward_tokens_per_s=round(stats.tokens / stats.forward_s, 1) if stats.forward_s else 0,
            padding=round(1 - stats.tokens / stats.padded_tokens, 3) if stats.padded_tokens else 0,
            outstanding=self.gate.last_outstanding,
            elapsed_s=round(elapsed, 1),
        )


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its memory (not a view into the batch's buffer)."""
    if tensor.device.type != "cpu":
        return tensor.to("cpu").contiguous()
    return tensor.clone(memory_format=torch.contiguous_format)
