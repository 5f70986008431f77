"""MLflow: one MLflow run per process and role in the experiment ``tracking.project`` (the
``mlflow`` extra). ``tracking.tracking_uri`` empty: mlflow's default (``MLFLOW_TRACKING_URI``,
else ``./mlruns``). The client API, not mlflow's global active run: a colocated run has the
trainer's and the evaluator's in one process."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specforge_common.contracts import RunSpec


class MlflowTracker:
    def __init__(self, spec: RunSpec, role: str) -> None:
        from mlflow.entities import Metric  # ImportError without the extra
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        tracking = spec.tracking
        self.client = MlflowClient(tracking_uri=tracking.tracking_uri or None)
        experiment = self.client.get_experiment_by_name(tracking.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(tracking.project)
            except MlflowException:  # the other role created it meanwhile
                experiment_id = self.client.get_experiment_by_name(tracking.project).experiment_id
        tags = {"specforge.run_id": spec.run_id, "specforge.role": role,
                "specforge.spec_hash": spec.spec_hash()}  # fmt: skip
        run = self.client.create_run(experiment_id, run_name=f"{spec.run_id}-{role}", tags=tags)
        self.run_id = run.info.run_id

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(tag, float(value), now, step) for tag, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
