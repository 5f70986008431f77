"""TensorBoard: event files written by torch's ``SummaryWriter`` (the ``tensorboard`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class TensorBoardTracker:
    """One role's event files in ``log_dir``; each process writes its own file there."""

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), global_step=step)
        self.writer.flush()  # a few lines per log window: on disk for a live TensorBoard

    def close(self) -> None:
        self.writer.close()
