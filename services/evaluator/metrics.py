"""The evaluator's Prometheus metrics (served by ``specforge evaluate --metrics-port``).

The gauges hold the last published ``EvalResult``: both acceptance-length conventions (offline
simulated and real speculative decoding), losslessness, speedup, the per-position offline
acceptance and the checkpoint step they belong to. A measurement the result does not carry
(no serving evaluation, an empty eval split) reads NaN, never a stale value of an older step.
"""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

from specforge_common.contracts import EvalResult
from specforge_common.metrics import ServiceMetrics, never_raises

SERVICE = "evaluator"
EVAL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

RESULT_GAUGES = {  # name -> help
    "specforge_eval_checkpoint_step": "Optimizer step of the last evaluated checkpoint",
    "specforge_eval_simulated_acceptance_length":
        "Offline acceptance length on the eval split: sum_k prod_{i<=k} acc_i, no bonus token",
    "specforge_eval_serving_acceptance_length":
        "Tokens per verification in real speculative decoding, bonus token included",
    "specforge_eval_lossless":
        "1 when speculative decoding reproduced the target's greedy output exactly, else 0",
    "specforge_eval_speedup": "Speculative over target-only decoding throughput",
}  # fmt: skip


def _value(value: float | bool | None) -> float:
    return math.nan if value is None else float(value)


class EvaluatorMetrics(ServiceMetrics):
    """The last result's gauges, checkpoint counts by outcome and the evaluation time."""

    def __init__(self, run_id: str) -> None:
        super().__init__(SERVICE, run_id)
        self.result_gauges = {
            name: Gauge(name, help_text, ["run"], registry=self.registry).labels(run=run_id)
            for name, help_text in RESULT_GAUGES.items()
        }
        for gauge in self.result_gauges.values():
            gauge.set(math.nan)  # nothing evaluated yet (0 would read "not lossless", "step 0")
        self.acceptance_rate = Gauge(
            "specforge_eval_acceptance_rate",
            "Offline acceptance rate per drafted position on the eval split (0..1)",
            ["run", "position"],
            registry=self.registry,
        )
        self.checkpoints = Counter(
            "specforge_eval_checkpoints_total",
            "Checkpoint events settled, by outcome (evaluated or dead_lettered)",
            ["run", "outcome"],
            registry=self.registry,
        )
        for outcome in ("evaluated", "dead_lettered"):
            self.checkpoints.labels(run=run_id, outcome=outcome)
        self.seconds = Histogram(
            "specforge_eval_seconds",
            "Wall time of one checkpoint's evaluation (load, offline, serving)",
            ["run"],
            buckets=EVAL_BUCKETS,
            registry=self.registry,
        ).labels(run=run_id)

    @never_raises
    def evaluated(self, result: EvalResult) -> None:
        """A result published on the bus."""
        values = {
            "specforge_eval_checkpoint_step": result.step,
            "specforge_eval_simulated_acceptance_length": result.simulated_acceptance_length,
            "specforge_eval_serving_acceptance_length": result.serving_acceptance_length,
            "specforge_eval_lossless": result.lossless,
            "specforge_eval_speedup": result.metrics.get("speedup"),
        }
        for name, value in values.items():
            self.result_gauges[name].set(_value(value))
        self.acceptance_rate.clear()  # a result with fewer positions leaves none stale
        for position, rate in enumerate(result.acceptance_rates):
            self.acceptance_rate.labels(run=self.run_id, position=str(position)).set(rate)
        self.checkpoints.labels(run=self.run_id, outcome="evaluated").inc()
        self.seconds.observe(sum(result.wall_seconds.values()))

    @never_raises
    def dead_lettered(self) -> None:
        self.checkpoints.labels(run=self.run_id, outcome="dead_lettered").inc()
