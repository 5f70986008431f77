"""The capture worker's Prometheus metrics (served by ``specforge capture --metrics-port``).

The totals are the worker's own ``CaptureStats``, read at scrape time: the numbers the progress
log lines print, kept in one place, with no second set of increments beside each ``stats`` one.
Latencies are observed where the work happens: each target forward (a prefill batch, or a
decode-mode generation group), each sample's feature-store put.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specforge_common.metrics import ServiceMetrics, never_raises

from .ledger import CaptureStats
from .names import SERVICE

# A tiny CPU target forwards in milliseconds, an 8B one on a GPU batch in tenths of a second,
# a long decode-mode generation in tens of seconds.
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

COUNTERS = (  # (name, help, CaptureStats field)
    ("specforge_capture_prompts", "Prompts captured: SampleRef stored by JetStream, prompt acked",
     "prompts_captured"),
    ("specforge_capture_tokens", "Real (unpadded) tokens captured", "tokens"),
    ("specforge_capture_store_bytes", "Feature bytes written to the feature store",
     "store_bytes"),
    ("specforge_capture_naks", "Prompts handed back for a retry after a possibly transient "
     "failure", "retried"),
    ("specforge_capture_dead_letters", "Prompts dead-lettered (can never be captured)",
     "dead_lettered"),
)  # fmt: skip


class _StatsCollector(Collector):
    """The counters and the token rate of one worker's ``CaptureStats``, at scrape time."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.stats = CaptureStats()
        self.started = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for name, help_text, attribute in COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=["run"])
            family.add_metric([self.run_id], float(getattr(stats, attribute)))
            yield family
        rate = GaugeMetricFamily(
            "specforge_capture_tokens_per_second",
            "Tokens captured per second since the worker started (what progress logs print)",
            labels=["run"],
        )
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate.add_metric([self.run_id], stats.tokens / elapsed)
        yield rate


class CaptureMetrics(ServiceMetrics):
    """Totals, token rate, forward and store latencies, and the prompt consumers' lag."""

    def __init__(self, run_id: str) -> None:
        super().__init__(SERVICE, run_id)
        self._stats = _StatsCollector(run_id)
        self.registry.register(self._stats)
        self.forward_seconds = Histogram(
            "specforge_capture_forward_seconds",
            "Wall time of one target forward: a prefill batch, or a decode-mode generation group",
            ["run", "mode"],
            buckets=FORWARD_BUCKETS,
            registry=self.registry,
        )
        self.store_write_seconds = Histogram(
            "specforge_capture_store_write_seconds",
            "Wall time of one sample's feature-store put",
            ["run"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        ).labels(run=run_id)

    def watch(self, stats: CaptureStats) -> None:
        """Export ``stats`` (the running worker's), its token rate counted from now."""
        self._stats.stats = stats
        self._stats.started = time.monotonic()

    @never_raises
    def forward(self, seconds: float, mode: str) -> None:
        self.forward_seconds.labels(run=self.run_id, mode=mode).observe(seconds)

    @never_raises
    def store_write(self, seconds: float) -> None:
        self.store_write_seconds.observe(seconds)
