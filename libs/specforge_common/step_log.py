"""Append-only JSON-lines logs keyed by optimizer step, cut back on resume, and where they live.

The trainer keeps two: which samples each optimizer step trained on (``trained_samples.jsonl``,
per rank) and the metrics of each log window (``train_metrics.jsonl``, rank 0; the evaluator's
report plots it). A resume from step ``s`` keeps the entries of steps ``<= s`` only, so each
log describes exactly the weights it sits next to. Lines are flushed as written (a kill -9
keeps them) and fsynced at checkpoints; a torn last line from a crash is skipped when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from specforge_common.durable import write_atomic

TRAINED_SAMPLES_NAME = "trained_samples.jsonl"
TRAIN_METRICS_NAME = "train_metrics.jsonl"


def trained_samples_path(output_dir: str | Path, run_id: str, rank: int = 0) -> Path:
    """Where rank ``rank`` of a run logs the sample ids of each optimizer step."""
    name = TRAINED_SAMPLES_NAME if rank == 0 else f"trained_samples.rank{rank}.jsonl"
    return (Path(output_dir) / run_id / name).absolute()


def train_metrics_path(output_dir: str | Path, run_id: str) -> Path:
    """Where rank 0 logs the metrics of every log window."""
    return (Path(output_dir) / run_id / TRAIN_METRICS_NAME).absolute()


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a step log; a torn or foreign line is skipped."""
    entries = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


class StepLog:
    """One open step log; ``keep_through=None`` starts it afresh."""

    def __init__(self, path: str | Path, keep_through: int | None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_through is not None:
            kept = [e for e in read_step_log(self.path) if e["step"] <= keep_through]
        write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in kept))
        self._file: IO[str] = open(self.path, "a")

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def sync(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
