"""The trainer: a run's train samples -> EAGLE-3 draft updates -> checkpoints and events.

``Trainer.run`` builds everything from the run id (``build.py``), resumes from the run's latest
checkpoint when asked (``checkpointing.py``), then reads the samples log (``data.py``) and
trains. The compute (collate, forward, backward, optimizer step) runs in a worker thread, so
the event loop keeps reading the samples log, prefetching features and talking to NATS
meanwhile. Logs, step logs and progress records are ``telemetry.py``'s; the counters a
checkpoint stores are ``position.py``'s. See docs/architecture.md for the services around it.

Per optimizer step: ``accumulation_steps`` micro-batches, each loss divided by it (a trailing
partial window is rescaled to a full one) — or, for a strategy whose output carries a
``loss_weight`` (a weighted sum, ``specforge_common.strategy``), the summed gradients divided by the
weight of the whole window over all ranks — then global grad-norm clipping at ``max_grad_norm`` (the
pre-clip norm is logged; a non-finite norm skips the update), AdamW, and the LR of
``schedule.lr_at``. A fresh start seeds torch's global RNG with ``spec.seed + rank``.
``request_stop()`` (SIGTERM) writes a checkpoint at the current step and returns.

Multi-rank (``world_size > 1``): each rank reads its shard of the split (``SampleStream``:
position in split ``% world_size == rank``). Every micro-step starts with one small all-reduce
(MAX) of ``[have a batch, have more after it, stop requested]``, so all ranks agree on the
accumulation boundary, the end of data and a stop: a rank whose shard ran out while others
still have data runs a zero-loss forward/backward on a dummy batch (zero gradients, same
collectives), so all ranks make the same number of optimizer steps. As DDP averages gradients
over all ranks, such a step weighs the remaining ranks' gradients by ``1 / world_size`` (like a
smaller global batch); it only happens in the last optimizer steps of a run, and its
trained-samples entry lists no samples. The global batch of one optimizer step is
``world_size * batch_size * accumulation_steps`` samples; non-boundary micro-steps run under
``no_sync()`` (one gradient all-reduce per optimizer step) and clipping uses the global norm of
the all-reduced gradients.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import nullcontext

import torch

from specforge_common import faults
from specforge_common.aio import cancel_and_wait
from specforge_common.batch import TrainBatch, feature_keys
from specforge_common.bus import Bus
from specforge_common.contracts import RunSpec
from specforge_common.lag_metrics import LagSource
from specforge_common.log import get_logger
from specforge_common.precision import autocast
from specforge_common.progress import Figure
from specforge_common.strategy import StrategyMetrics
from specforge_common.tracking import TrackingUnavailable, require_backend

from .build import Parallel, TrainerError, TrainerParts, build_parts, resolve_device
from .checkpointing import Checkpointer
from .checkpoints import SavedCheckpoint
from .data import BatchReader, SampleStream, StreamBatch, collate
from .distributed import DistEnv, all_reduce_flags, all_reduce_sum
from .metrics import TrainerMetrics
from .position import TrainingPosition
from .telemetry import Telemetry, TrainResult

__all__ = ["TrainResult", "Trainer", "TrainerError"]

SERVICE = "trainer"


class Trainer:
    """One rank of a run's trainer: ``await Trainer(bus, run_id).run()``."""

    parts: TrainerParts  # set by setup()
    position: TrainingPosition  # set by run(), with the two below
    telemetry: Telemetry
    checkpointer: Checkpointer

    def __init__(
        self,
        bus: Bus,
        run_id: str,
        *,
        device: str = "cpu",
        rank: int = 0,
        spec_timeout: float = 60.0,
        summary_timeout: float | None = None,
        prefetch: int | None = None,
        fetch_threads: int = 2,
        resume: bool = False,
        world_size: int = 1,
        local_rank: int | None = None,
        parallel: Parallel = "ddp",
        threads_after_capture: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise TrainerError(f"rank {rank} is outside world size {world_size}")
        if parallel not in ("ddp", "fsdp"):
            raise TrainerError(f"parallel must be 'ddp' or 'fsdp', not {parallel!r}")
        self.bus, self.run_id, self.parallel, self.resume = bus, run_id, parallel, resume
        self.rank, self.world_size = rank, world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.device = resolve_device(device, world_size, self.local_rank)
        self.spec_timeout, self.summary_timeout = spec_timeout, summary_timeout
        self.prefetch, self.fetch_threads = prefetch, fetch_threads
        # Epochs after the first read a complete log: capture is done and its cores are free.
        self.threads_after_capture = threads_after_capture
        self.log = get_logger(service=SERVICE, run=run_id, rank=rank)
        # Always kept (cheap); served when the command is given a metrics port (rank 0 only).
        self.metrics = TrainerMetrics(run_id)
        self._stop = asyncio.Event()
        self._ready = False

    @property
    def spec(self) -> RunSpec:
        return self.parts.spec

    def request_stop(self) -> None:
        """Checkpoint at the current step and return from ``run`` (signal-handler safe)."""
        if not self._stop.is_set():
            self.log.warning("stop requested: checkpointing at the current step")
        self._stop.set()

    def progress_figures(self) -> list[Figure]:
        """What a live progress bar shows of this rank (read from the bar's thread)."""
        position, telemetry = getattr(self, "position", None), getattr(self, "telemetry", None)
        if not self._ready or position is None:
            return []
        accept = telemetry.latest_metrics.get("simulated_acc_len") if telemetry else None
        return [
            Figure("trained", position.samples_consumed),
            Figure("step", position.global_step, total=self.parts.total_steps, lead=True),
            Figure("accept-len (train)", accept, digits=2),
        ]

    async def setup(self) -> None:
        """Read the run and build the draft (``run`` calls it; a second call does nothing)."""
        if self._ready:
            return
        env = DistEnv(self.rank, self.world_size, self.local_rank)
        self.parts = await build_parts(
            self.bus, self.run_id, env, self.device, self.parallel,
            spec_timeout=self.spec_timeout, summary_timeout=self.summary_timeout, log=self.log,
        )  # fmt: skip
        self.log = self.log.bind(spec_hash=self.parts.spec_hash)
        self._ready = True

    async def run(self) -> TrainResult:
        await self.setup()
        try:
            require_backend(self.spec)  # every rank: none starts a run rank 0 would abandon
        except TrackingUnavailable as exc:
            raise TrainerError(str(exc)) from None
        self.position = TrainingPosition()
        self.telemetry = Telemetry(self.bus, self.spec, self.parts.spec_hash, self.rank,
                                   self.world_size, self.log,
                                   self.parts.strategy.empty_metrics(), self.metrics)  # fmt: skip
        self._window_weight: torch.Tensor | None = None  # weighted losses: this window's sum
        self.checkpointer = Checkpointer(self.bus, self.parts, self.telemetry, rank=self.rank,
                                         world_size=self.world_size, parallel=self.parallel,
                                         log=self.log)  # fmt: skip
        point = self.checkpointer.resume_point() if self.resume else None
        resumed_from: int | None = None
        if point is not None:
            step_dir, state = point
            if state.get("final"):
                return await self.checkpointer.finished(step_dir, state)
            self.position = await self.checkpointer.resume(step_dir, state)
            self.telemetry.latest_metrics = dict(state.get("metrics") or {})
            resumed_from = self.position.global_step
            self.log.info("resuming", step=resumed_from, checkpoint=str(step_dir),
                          epoch=self.position.epoch, samples=self.position.samples_consumed,
                          start_seq=self.position.last_sequence + 1)  # fmt: skip
        else:
            torch.manual_seed(self.spec.seed + self.rank)  # training randomness is the spec's
        try:
            self.telemetry.start_tracking(resumed_from)
        except TrackingUnavailable as exc:
            raise TrainerError(str(exc)) from None
        self.telemetry.open_step_logs(resumed_from)
        try:
            return await self._train(resumed_from)
        finally:
            self.telemetry.close_step_logs()
            self.telemetry.stop_tracking()

    async def _train(self, resumed_from: int | None) -> TrainResult:
        parts, train, position = self.parts, self.spec.train, self.position
        stream = SampleStream(
            self.bus, parts.store, parts.data_run, spec_hash=parts.data_spec_hash,
            epochs=train.epochs, start_seq=position.last_sequence + 1, first_epoch=position.epoch,
            prefetch=self.prefetch or max(4, 2 * train.batch_size),
            fetch_threads=self.fetch_threads, aux_size=len(parts.layer_ids) * parts.target_hidden,
            hidden_size=parts.target_hidden, method=parts.method, service=SERVICE, rank=self.rank,
            world_size=self.world_size, shuffle_window=train.shuffle_window,
            shuffle_seed=self.spec.seed, start_index=position.start_index(train.shuffle_window),
        )  # fmt: skip
        reader = BatchReader(stream, train.batch_size, seed=self.spec.seed)
        capped = train.total_steps is not None
        final: SavedCheckpoint | None = None
        started, total_compute, tokens_total = time.perf_counter(), 0.0, 0
        # An ordered reader: its lag is the samples stream's end minus what the weights have seen.
        lag = LagSource(parts.data_run, "samples", SERVICE, lambda: self.position.last_sequence)
        async with stream, self.metrics.polling_lag(self.bus, [lag]):
            if capped and position.global_step >= parts.total_steps:
                batch = None  # resumed at the step cap: only the final checkpoint is missing
            else:
                batch = await self._next_batch(reader)
            any_batch, any_more, any_stop = await self._agree(batch)
            ended = not any_batch and not any_stop
            if resumed_from is None:  # step 0; final too when there is no data
                await self.checkpointer.save(position, final=ended)
            window = self.telemetry.new_window(stream.stats.wait_s)
            micro = 0
            pending: list[StreamBatch] = []
            grad_norm, lr = float("nan"), parts.schedule(position.global_step)
            while any_batch and not any_stop:
                t0 = time.perf_counter()
                # Every rank agrees on the boundary: the window is full, or no rank has more.
                stepped = micro + 1 == train.accumulation_steps or not any_more
                parts.strategy.set_step(position.global_step)
                metrics = await asyncio.to_thread(self._forward_backward, batch, stepped)
                micro += 1
                window.add(metrics, batch)
                if batch is not None:
                    pending.append(batch)
                    tokens_total += batch.num_tokens
                if stepped:
                    grad_norm, lr = await asyncio.to_thread(self._optimizer_step, micro,
                                                            position.global_step)  # fmt: skip
                    faults.point("trainer.mid_step")  # weights stepped, position not advanced
                    micro = 0
                    # The position is what the weights have seen: a dropped partial window is not.
                    position.advance(pending)
                    self.telemetry.record_trained(position, pending)
                    self.checkpointer.track_trained(pending)
                    pending = []
                elapsed = time.perf_counter() - t0
                window.compute_s += elapsed
                total_compute += elapsed
                if stepped:
                    ended = not any_more or (capped and position.global_step >= parts.total_steps)
                    if position.global_step % train.log_every == 0 or ended:
                        self.telemetry.log_window(window, stream.stats.wait_s, position,
                                                  grad_norm, lr)  # fmt: skip
                        await self.telemetry.progress(position, done=False)
                        window = self.telemetry.new_window(stream.stats.wait_s)
                    if ended:
                        break
                    if position.global_step % train.checkpoint_every == 0:
                        await self.checkpointer.save(position, final=False)
                batch = await self._next_batch(reader)
                any_batch, any_more, any_stop = await self._agree(batch)
                ended = not any_batch and not any_stop
            stopped = not ended
            saved = self.checkpointer.saved
            if stopped:
                if window.micro_steps:  # steps since the last log (a partial window is dropped)
                    self.telemetry.log_window(window, stream.stats.wait_s, position, grad_norm, lr)
                if self.checkpointer.checkpointed_step != position.global_step:
                    await self.checkpointer.save(position, final=False)
            elif saved and saved[-1].final:
                final = saved[-1]  # no data at all: the step-0 checkpoint is the final one
            else:
                final = await self.checkpointer.save(position, final=True)
            await self.telemetry.progress(position, done=not stopped)
        return self.telemetry.finish(
            position, stream.stats, stopped=stopped, final=final, checkpoints=saved,
            resumed_from=resumed_from, started=started, compute_s=total_compute,
            tokens=tokens_total,
        )  # fmt: skip

    async def _next_batch(self, reader: BatchReader) -> StreamBatch | None:
        """The next batch, or None at end of data or when a stop was requested meanwhile."""
        if self._stop.is_set():
            return None
        fetch = asyncio.ensure_future(reader.next())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if fetch.done():
            batch = fetch.result()
            if batch is not None and batch.epoch > 0 and self.threads_after_capture:
                if torch.get_num_threads() != self.threads_after_capture:
                    self.log.info("capture is done: training on more threads",
                                  threads=self.threads_after_capture)  # fmt: skip
                    torch.set_num_threads(self.threads_after_capture)
            return batch
        await cancel_and_wait(fetch)
        return None

    async def _agree(self, batch: StreamBatch | None) -> tuple[bool, bool, bool]:
        """(some rank has a batch, some rank has data after it, some rank was told to stop)."""
        flags = [int(batch is not None), int(batch is not None and not batch.last),
                 int(self._stop.is_set())]  # fmt: skip
        if self.world_size > 1:  # off the event loop: a rank may wait for the others' data
            flags = await asyncio.to_thread(all_reduce_flags, flags)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    # --- compute (worker thread) -----------------------------------------------------------

    def _dummy_batch(self) -> TrainBatch:
        """A tiny finite batch for the zero-loss step of a rank whose shard ran out."""
        T, H, parts = 4, self.parts.target_hidden, self.parts
        sample = {
            "input_ids": torch.zeros(T, dtype=torch.int64),
            "loss_mask": torch.ones(T, dtype=torch.int64),
            "aux_hidden_states": torch.zeros(T, len(parts.layer_ids) * H),
            "hidden_states": torch.zeros(T, H),
        }
        return collate([{k: sample[k] for k in feature_keys(parts.method)}], seeds=[0])

    def _forward_backward(self, batch: StreamBatch | None, sync: bool = True) -> StrategyMetrics:
        """One micro-step; ``batch=None``: a zero-loss step (zero gradients, same collectives).
        ``sync=False`` (not an optimizer-step boundary): no gradient all-reduce."""
        parts, train = self.parts, self.spec.train
        train_batch = (self._dummy_batch() if batch is None else batch.collate()).to(self.device)
        no_sync = parts.ddp.no_sync() if parts.ddp is not None and not sync else nullcontext()
        if parts.fsdp:  # FSDP's no_sync: keep unsharded gradients, reduce-scatter at the boundary
            parts.compute.set_requires_gradient_sync(sync)
        with no_sync:
            with autocast(parts.precision):
                loss, metrics, weight = parts.compute(train_batch)
            if batch is None:
                (loss * 0.0).backward()
            elif weight is not None:  # a weighted sum: normalised by the window at the step
                loss.backward()
                weight = weight.detach().double()
                self._window_weight = (
                    weight if self._window_weight is None else (self._window_weight + weight)
                )
            else:
                (loss / train.accumulation_steps).backward()
        if batch is None:
            return metrics.zero()
        return metrics

    def _optimizer_step(self, micro_batches: int, step: int) -> tuple[float, float]:
        """Rescale a partial window, clip, step AdamW at the schedule's LR: (grad norm, LR)."""
        parts, train = self.parts, self.spec.train
        if self._window_weight is not None or parts.weighted_loss:
            # sum(w * l) / sum(w) over the window and the ranks; DDP/FSDP averaged the ranks'
            # gradient sums, hence the world size
            weight = (
                self._window_weight
                if self._window_weight is not None
                else torch.zeros((), dtype=torch.float64)
            )
            total = all_reduce_sum([float(weight)])[0]
            scale = self.world_size / total if total > 0 else 0.0
            for p in parts.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            self._window_weight = None
        elif micro_batches != train.accumulation_steps:  # a trailing partial window: its average
            for p in parts.params:
                if p.grad is not None:
                    p.grad.mul_(train.accumulation_steps / micro_batches)
        max_norm = train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(parts.params, max_norm if max_norm > 0 else math.inf)
        if parts.fsdp:  # a DTensor over the shards: the global norm
            norm = norm.full_tensor()
        norm = float(norm)
        lr = parts.schedule(step)
        if math.isfinite(norm):
            for group in parts.optimizer.param_groups:
                group["lr"] = lr
            parts.optimizer.step()
        else:
            self.log.warning("non-finite gradient norm: update skipped", step=step, grad_norm=norm)
        parts.optimizer.zero_grad(set_to_none=True)
        return norm, lr
