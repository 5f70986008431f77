"""What a trainer reports besides checkpoints: log lines, step logs, progress, its result.

Every ``log_every`` optimizer steps (and at the end) one JSON log line of the window's metrics,
summed over the ranks before any ratio is taken (a collective), the same numbers as Prometheus
gauges (``metrics.py``), and a ``TrainerProgress`` per rank in the KV bucket (capture reads it
for backpressure). Each optimizer step's wall time goes to the step-time histogram.

Step logs (``specforge_common.step_log``): every optimizer step appends ``{"step", "epoch",
"rank", "seqs", "samples"}`` to ``<output_dir>/<run>/trained_samples.jsonl`` (rank > 0:
``trained_samples.rank<N>.jsonl``), so it lists exactly what the weights saw; rank 0 appends
every log line's metrics to ``<output_dir>/<run>/train_metrics.jsonl`` (``specforge report``
plots it). A resume cuts both back to the checkpoint's step; both are fsynced before each
checkpoint that covers them.

Tracking (``spec.tracking``, ``specforge_common.tracking``): rank 0 sends every log line's
metrics (``train_scalars``: ``train/loss``, ``train/acc_pos0``, ...) at its optimizer step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specforge_common.bus import Bus
from specforge_common.contracts import RunSpec, TrainerProgress
from specforge_common.step_log import StepLog, train_metrics_path, trained_samples_path
from specforge_common.strategy import StrategyMetrics
from specforge_common.subjects import progress_key
from specforge_common.tracking import NullTracker, Tracker, open_tracker

from .checkpoints import SavedCheckpoint
from .data import StreamBatch, StreamStats
from .distributed import all_reduce_metrics, all_reduce_sum
from .position import TrainingPosition

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from .metrics import TrainerMetrics

__all__ = ["LogWindow", "Telemetry", "TrainResult", "train_scalars"]


def train_scalars(entry: Mapping[str, float]) -> dict[str, float]:
    """A log line's metrics as tracker tags (the step is the tracker's own axis):
    ``acc_<k>`` -> ``train/acc_pos<k>``, everything else -> ``train/<name>``."""
    scalars = {}
    for key, value in entry.items():
        if key == "step":
            continue
        position = key.removeprefix("acc_")
        name = f"acc_pos{position}" if key.startswith("acc_") and position.isdigit() else key
        scalars[f"train/{name}"] = value
    return scalars


@dataclass
class TrainResult:
    """What ``Trainer.run`` returns: where training ended, its checkpoints and throughput."""

    step: int
    samples_consumed: int
    last_sequence: int
    stopped: bool  # stopped by request_stop() before the end of data
    final: SavedCheckpoint | None  # the final checkpoint (None when stopped)
    checkpoints: list[SavedCheckpoint]
    history: list[dict[str, float]]  # every logged entry
    samples_per_s: float
    tokens_per_s: float
    data_wait_fraction: float
    stream: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    resumed_from: int | None = None  # the step of the checkpoint this run resumed from
    already_finished: bool = False  # the run had a final checkpoint: nothing was trained

    @property
    def last_checkpoint(self) -> SavedCheckpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None


@dataclass
class LogWindow:
    """What accumulates between two log lines."""

    metrics: StrategyMetrics
    wait_mark: float  # the stream's wait time when the window opened
    micro_steps: int = 0  # the same on every rank (zero-loss steps count)
    samples: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, metrics: StrategyMetrics, batch: StreamBatch | None) -> None:
        self.micro_steps += 1
        self.metrics = self.metrics + metrics
        if batch is not None:
            self.samples += batch.num_samples
            self.tokens += batch.num_tokens


class Telemetry:
    """One rank's log lines, step logs, progress records and result for one ``Trainer.run``."""

    def __init__(self, bus: Bus, spec: RunSpec, spec_hash: str, rank: int, world_size: int,
                 log: FilteringBoundLogger, empty_metrics: StrategyMetrics,
                 metrics: TrainerMetrics) -> None:  # fmt: skip
        self.bus, self.spec, self.spec_hash, self.log = bus, spec, spec_hash, log
        self.empty_metrics, self.metrics = empty_metrics, metrics
        self.run_id, self.rank, self.world_size = spec.run_id, rank, world_size
        self.history: list[dict[str, float]] = []  # every logged entry
        self.latest_metrics: dict[str, float] = {}  # the last one (a resume: the checkpoint's)
        self._trained: StepLog | None = None
        self._metrics_log: StepLog | None = None
        self._tracker: Tracker = NullTracker()
        self._step_mark: float | None = None  # when the last optimizer step ended

    def new_window(self, wait_s: float) -> LogWindow:
        if self._step_mark is None:  # the first window: the first step's time starts here
            self._step_mark = time.perf_counter()
        return LogWindow(self.empty_metrics.zero(), wait_mark=wait_s)

    def open_step_logs(self, keep_through: int | None) -> None:
        """Start the logs afresh, or (resume) keep only the entries of steps <= keep_through."""
        output_dir = self.spec.output_dir
        self._trained = StepLog(trained_samples_path(output_dir, self.run_id, self.rank),
                                keep_through)  # fmt: skip
        if self.rank == 0:
            self._metrics_log = StepLog(train_metrics_path(output_dir, self.run_id), keep_through)

    def close_step_logs(self) -> None:
        for log in (self._trained, self._metrics_log):
            if log is not None:
                log.close()

    def start_tracking(self, resumed_from: int | None) -> None:
        """Rank 0 opens the run's tracker; a resume logs again from the step after its
        checkpoint, so what an earlier attempt logged from there on is hidden."""
        if self.rank == 0:
            first = 0 if resumed_from is None else resumed_from + 1
            self._tracker = open_tracker(self.spec, "train", first_step=first)

    def stop_tracking(self) -> None:
        self._tracker.close()
        self._tracker = NullTracker()

    def sync_step_logs(self) -> None:
        """On disk before the checkpoint that covers them."""
        for log in (self._trained, self._metrics_log):
            if log is not None:
                log.sync()

    def record_trained(self, position: TrainingPosition, batches: list[StreamBatch]) -> None:
        """The trained-samples entry of the optimizer step ``position`` has just taken (and
        the step's wall time, for the step-time histogram)."""
        assert self._trained is not None, "open_step_logs first"
        now = time.perf_counter()
        if self._step_mark is not None:
            self.metrics.optimizer_step(now - self._step_mark)
        self._step_mark = now
        samples = [s for b in batches for s in b.samples]
        self._trained.append({"step": position.global_step, "epoch": position.epoch,
                              "rank": self.rank, "seqs": [s.seq for s in samples],
                              "samples": [s.ref.sample_id for s in samples]})  # fmt: skip

    def log_window(self, window: LogWindow, wait_s: float, position: TrainingPosition,
                   grad_norm: float, lr: float) -> dict[str, float]:  # fmt: skip
        """One log line of the window's metrics, summed over the ranks (a collective);
        ``wait_s`` is the stream's wait time at this call."""
        wall = max(time.perf_counter() - window.started, 1e-9)
        waited = wait_s - window.wait_mark
        busy = window.compute_s + waited
        metrics, samples, tokens = window.metrics, window.samples, window.tokens
        if self.world_size > 1:
            metrics = all_reduce_metrics(metrics)
            samples, tokens = all_reduce_sum([float(samples), float(tokens)])
        summary = metrics.summary()
        K = self.spec.train.ttt_length
        entry: dict[str, float] = {
            "step": float(position.global_step),
            "epoch": float(position.epoch),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss": summary["loss"],
            **{f"acc_{k}": summary[f"acc_{k}"] for k in range(K)},
            "acc": summary["acc"],
            "simulated_acc_len": summary["simulated_acc_len"],
            "samples_per_s": samples / wall,
            "tokens_per_s": tokens / wall,
            "data_wait": waited / busy if busy > 0 else 0.0,
        }
        self.log.info("train", **{k: (int(v) if k in ("step", "epoch") else round(v, 6))
                                  for k, v in entry.items()})  # fmt: skip
        if self._metrics_log is not None:
            self._metrics_log.append({"step": position.global_step, "epoch": position.epoch,
                                      **{k: v for k, v in entry.items()
                                         if k not in ("step", "epoch")}})  # fmt: skip
        self._tracker.log_scalars(position.global_step, train_scalars(entry))
        self.metrics.window(entry, position.samples_consumed)
        self.history.append(entry)
        self.latest_metrics = entry
        return entry

    async def progress(self, position: TrainingPosition, *, done: bool) -> None:
        record = TrainerProgress(run_id=self.run_id, rank=self.rank, step=position.global_step,
                                 samples_consumed=position.samples_consumed,
                                 last_sequence=position.last_sequence, done=done,
                                 run_spec_hash=self.spec_hash)  # fmt: skip
        await self.bus.put_record(progress_key(self.run_id, self.rank), record)

    def finish(self, position: TrainingPosition, stats: StreamStats, *, stopped: bool,
               final: SavedCheckpoint | None, checkpoints: list[SavedCheckpoint],
               resumed_from: int | None, started: float, compute_s: float,
               tokens: int) -> TrainResult:  # fmt: skip
        """The run's result and its last log line; ``started`` is when training began
        (``time.perf_counter``), ``compute_s`` and ``tokens`` are the run's totals."""
        wall = max(time.perf_counter() - started, 1e-9)
        busy = compute_s + stats.wait_s
        result = TrainResult(
            step=position.global_step, samples_consumed=position.samples_consumed,
            last_sequence=position.last_sequence, stopped=stopped, final=final,
            checkpoints=list(checkpoints), history=self.history,
            samples_per_s=position.samples_consumed / wall, tokens_per_s=tokens / wall,
            data_wait_fraction=stats.wait_s / busy if busy > 0 else 0.0,
            stream=dataclasses.asdict(stats), resumed_from=resumed_from,
            rank=self.rank, world_size=self.world_size,
        )  # fmt: skip
        self.log.info(
            "training stopped" if stopped else "training done", step=position.global_step,
            samples=position.samples_consumed, last_sequence=position.last_sequence,
            samples_per_s=round(result.samples_per_s, 3),
            tokens_per_s=round(result.tokens_per_s, 1),
            data_wait=round(result.data_wait_fraction, 4),
            skipped_foreign=stats.skipped_foreign, dead_lettered=stats.dead_lettered,
            recaptured=stats.recaptured, final=str(final.path) if final else None,
            checkpoint=str(checkpoints[-1].path) if checkpoints else None,
        )  # fmt: skip
        return result
