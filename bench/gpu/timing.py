"""Phase timings of repeated work: CUDA events on a GPU (no host sync inside the timed work),
``perf_counter`` on a CPU."""

from __future__ import annotations

import statistics
import time

import torch


class Marks:
    """Named time marks of one repetition; ``durations`` reads them after the work is done."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds from each mark to the next, named after the later mark."""
        if self.cuda:
            self.marks[-1][1].synchronize()  # type: ignore[union-attr]
        out: dict[str, float] = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:], strict=False):
            if self.cuda:
                out[name] = start.elapsed_time(end)  # type: ignore[union-attr]
            else:
                out[name] = (end - start) * 1e3  # type: ignore[operator]
        return out


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-phase median over repetitions."""
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}
