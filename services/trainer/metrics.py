"""The trainer's Prometheus metrics (served by rank 0 of ``specforge train --metrics-port``).

The gauges are the log window's entry (``Telemetry.log_window``): summed over the ranks before
any ratio is taken, so rank 0's values are the whole run's and no other rank needs to serve. The
step-time histogram observes each optimizer step's wall time, data waits and checkpoints
included (the time a step really takes).
"""

from __future__ import annotations

import math
import re

from prometheus_client import Gauge, Histogram

from specforge_common.metrics import ServiceMetrics, never_raises

SERVICE = "trainer"
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_POSITION = re.compile(r"acc_(\d+)")

# Log-window entry key -> (gauge name, help).
WINDOW_GAUGES = {
    "step": ("specforge_trainer_optimizer_step", "Optimizer steps taken (at the last log window)"),
    "epoch": ("specforge_trainer_epoch", "Epoch of the samples log being read"),
    "loss": ("specforge_trainer_loss", "Training loss over the last log window"),
    "lr": ("specforge_trainer_learning_rate", "Learning rate of the last optimizer step"),
    "grad_norm": ("specforge_trainer_grad_norm",
                  "Pre-clip global gradient norm of the last optimizer step"),
    "tokens_per_s": ("specforge_trainer_tokens_per_second",
                     "Tokens trained per second over the last log window (all ranks)"),
    "samples_per_s": ("specforge_trainer_samples_per_second",
                      "Samples trained per second over the last log window (all ranks)"),
    "data_wait": ("specforge_trainer_data_wait_fraction",
                  "Share of the last log window's busy time spent waiting for samples (0..1)"),
    "simulated_acc_len": ("specforge_trainer_simulated_acceptance_length",
                          "Acceptance length simulated from the window's per-position accuracy"),
}  # fmt: skip


class TrainerMetrics(ServiceMetrics):
    """Log-window gauges, per-position accuracy, step-time histogram and samples-log lag."""

    def __init__(self, run_id: str) -> None:
        super().__init__(SERVICE, run_id)
        self.window_gauges = {
            key: Gauge(name, help_text, ["run"], registry=self.registry).labels(run=run_id)
            for key, (name, help_text) in WINDOW_GAUGES.items()
        }
        for gauge in self.window_gauges.values():
            gauge.set(math.nan)  # no window logged yet (a loss of 0 would be a claim)
        self.accuracy = Gauge(
            "specforge_trainer_accuracy",
            "Draft top-1 accuracy per drafted position over the last log window (0..1)",
            ["run", "position"],
            registry=self.registry,
        )
        self.samples_consumed = Gauge(
            "specforge_trainer_samples_consumed",
            "Samples the weights have seen, all epochs (this rank)",
            ["run"],
            registry=self.registry,
        ).labels(run=run_id)
        self.step_seconds = Histogram(
            "specforge_trainer_step_seconds",
            "Wall time of one optimizer step (compute, data waits, logs and checkpoints)",
            ["run"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        ).labels(run=run_id)

    @never_raises
    def window(self, entry: dict[str, float], samples_consumed: int) -> None:
        """A log window's entry (``Telemetry.log_window``)."""
        for key, gauge in self.window_gauges.items():
            if key in entry:
                gauge.set(entry[key])
        for key, value in entry.items():
            match = _POSITION.fullmatch(key)
            if match:
                self.accuracy.labels(run=self.run_id, position=match.group(1)).set(value)
        self.samples_consumed.set(samples_consumed)

    @never_raises
    def optimizer_step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)
