"""Experiment tracking: the trainer's and the evaluator's scalars in TensorBoard, W&B or MLflow.

``open_tracker(spec, role)`` gives the backend ``spec.tracking`` names; every tracker takes
``log_scalars(step, {tag: value})`` and ``close()``, and ``none`` (the default) records nothing.
Tags are the caller's (``train/loss``, ``eval/serving_acceptance_length``); the step is the
optimizer step for both roles, so a checkpoint's scores line up with the training scalars of
the step it was taken at.

Tracking is operational, never part of the run: ``RunSpec.spec_hash`` leaves it out, and a
backend that fails mid-run (a full disk, a lost server) costs its scalars, not the run (the
failure is logged as a warning). tensorboard, wandb and mlflow are optional extras, imported only
when selected; a missing one raises :class:`TrackingUnavailable` with the pip command.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

from specforge_common.contracts import RunSpec
from specforge_common.log import get_logger

__all__ = [
    "Guarded",
    "NullTracker",
    "Role",
    "Tracker",
    "TrackingUnavailable",
    "open_tracker",
    "require_backend",
    "tensorboard_dir",
]

Role = Literal["train", "eval"]
# Each optional backend is a package of its name, installed by the extra of its name.
OPTIONAL_BACKENDS = ("tensorboard", "wandb", "mlflow")


class Tracker(Protocol):
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """``backend = "none"``: nothing is recorded."""

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TrackingUnavailable(RuntimeError):
    """The selected backend's package is not installed (its extra was not)."""


def tensorboard_dir(spec: RunSpec) -> Path:
    """The run's TensorBoard directory: ``tracking.dir``, else ``<output_dir>/<run>/tensorboard``;
    each role writes into its own subdirectory (``train/``, ``eval/``)."""
    if spec.tracking.dir:
        return Path(spec.tracking.dir).absolute()
    return (Path(spec.output_dir) / spec.run_id / "tensorboard").absolute()


def require_backend(spec: RunSpec) -> None:
    """Raise :class:`TrackingUnavailable` unless the selected backend's package is installed,
    without importing it (every rank of a trainer checks, only rank 0 opens a tracker)."""
    backend = spec.tracking.backend
    if backend in OPTIONAL_BACKENDS and importlib.util.find_spec(backend) is None:
        raise _unavailable(backend, f"no module named {backend!r}")


def _unavailable(backend: str, why: object) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"tracking.backend = {backend!r} needs the {backend} package, which is not installed "
        f"({why}): pip install 'specforge-services[{backend}]', "
        'or set tracking.backend = "none"'
    )


def open_tracker(spec: RunSpec, role: Role, *, first_step: int | None = None) -> Tracker:
    """The tracker of ``role`` for ``spec``'s run.

    ``first_step``: the first step this process will log (a resumed trainer redoes the steps
    after its checkpoint); TensorBoard hides what an earlier process logged from that step on.
    W&B and MLflow start a new run per process instead, named ``<run>-<role>`` and grouped by
    run id.
    """
    backend = spec.tracking.backend
    if backend == "none":
        return NullTracker()
    try:
        if backend == "tensorboard":
            from .tensorboard_writer import TensorBoardTracker

            tracker: Tracker = TensorBoardTracker(tensorboard_dir(spec) / role,
                                                  purge_step=first_step)  # fmt: skip
        elif backend == "wandb":
            from .wandb_run import WandbTracker

            tracker = WandbTracker(spec, role)
        elif backend == "mlflow":
            from .mlflow_run import MlflowTracker

            tracker = MlflowTracker(spec, role)
        else:
            raise ValueError(f"unknown tracking backend {backend!r}")
    except ImportError as exc:
        raise _unavailable(backend, exc) from exc
    return Guarded(tracker, backend, role)


class Guarded:
    """A backend's failure after it opened is a warning, never the run's failure."""

    def __init__(self, inner: Tracker, backend: str, role: Role) -> None:
        self.inner, self.backend = inner, backend
        self.log = get_logger(component="tracking", backend=backend, role=role)
        self.failures = 0

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        try:
            self.inner.log_scalars(step, scalars)
        except Exception as exc:  # operational: a lost scalar never stops training
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                self.log.warning("scalars not tracked", step=step, error=repr(exc),
                                 failures=self.failures)  # fmt: skip

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception as exc:  # operational, as above
            self.log.warning("tracker did not close cleanly", error=repr(exc))
