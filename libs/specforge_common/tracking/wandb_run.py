"""Weights & Biases: one W&B run per process and role (the ``wandb`` extra).

Credentials and mode come from wandb's own settings (``wandb login``, ``WANDB_API_KEY``,
``WANDB_MODE=offline``); the run's local files go under ``<output_dir>/<run>/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from specforge_common.contracts import RunSpec


class WandbTracker:
    def __init__(self, spec: RunSpec, role: str) -> None:
        import wandb  # ImportError without the extra

        local = Path(spec.output_dir) / spec.run_id
        local.mkdir(parents=True, exist_ok=True)
        tracking = spec.tracking
        # create_new: a colocated run has the trainer's and the evaluator's in one process
        self.run = wandb.init(
            project=tracking.project, entity=tracking.entity or None,
            name=f"{spec.run_id}-{role}", group=spec.run_id, job_type=role,
            config={"spec": msgspec.to_builtins(spec), "spec_hash": spec.spec_hash()},
            dir=str(local.absolute()), reinit="create_new",
        )  # fmt: skip

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()
