"""Experiment tracking: TensorBoard files as TensorBoard reads them, the no-op default, and a
clear error for a backend whose extra is not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from specforge_common.config import ConfigError, build_run_spec
from specforge_common.contracts import RunSpec, TargetSpec, TrackingSpec
from specforge_common.tracking import (
    Guarded,
    NullTracker,
    TrackingUnavailable,
    open_tracker,
    tensorboard_dir,
)
from tests.support import tensorboard_scalars

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="the tensorboard extra is not installed (pip install 'specforge-services[tensorboard]')",
)


def spec_with(tmp_path: Path, **tracking) -> RunSpec:
    return RunSpec(run_id="r", target=TargetSpec(path="/m"), output_dir=str(tmp_path / "runs"),
                   tracking=TrackingSpec(**tracking))  # fmt: skip


def test_none_is_the_default_and_records_nothing(tmp_path: Path) -> None:
    spec = spec_with(tmp_path)
    assert spec.tracking.backend == "none"
    tracker = open_tracker(spec, "train")
    assert isinstance(tracker, NullTracker)
    tracker.log_scalars(1, {"train/loss": 1.0})
    tracker.close()
    assert not (tmp_path / "runs").exists()


def test_tracking_is_configurable_but_not_part_of_the_spec_hash() -> None:
    base = {"run_id": "r1", "target": {"path": "/m"}}
    plain = build_run_spec(base, [], {})
    tracked = build_run_spec(base, ["tracking.backend=tensorboard", "tracking.dir=/tmp/tb"], {})
    assert (tracked.tracking.backend, tracked.tracking.dir) == ("tensorboard", "/tmp/tb")
    assert tracked.spec_hash() == plain.spec_hash()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(tracked), type=RunSpec) == tracked
    with pytest.raises(ConfigError, match="tracking.backend"):
        build_run_spec(base, ["tracking.backend=comet"], {})
    with pytest.raises(ConfigError, match="tracking.projct"):
        build_run_spec(base, ["tracking.projct=x"], {})


def test_tensorboard_dir_defaults_under_the_run_and_can_be_set(tmp_path: Path) -> None:
    assert tensorboard_dir(spec_with(tmp_path)) == tmp_path / "runs" / "r" / "tensorboard"
    assert tensorboard_dir(spec_with(tmp_path, dir=str(tmp_path / "tb"))) == tmp_path / "tb"


@needs_tensorboard
def test_tensorboard_scalars_read_back_per_role(tmp_path: Path) -> None:
    spec = spec_with(tmp_path, backend="tensorboard")
    train, evals = open_tracker(spec, "train"), open_tracker(spec, "eval")
    for step in (1, 2, 3):
        train.log_scalars(step, {"train/loss": 4.0 / step, "train/acc_pos0": step / 4})
    evals.log_scalars(3, {"eval/serving_acceptance_length": 2.5})
    train.close()
    evals.close()
    root = tensorboard_dir(spec)
    assert tensorboard_scalars(root / "train") == {
        "train/loss": [(1, 4.0), (2, 2.0), (3, pytest.approx(4 / 3))],
        "train/acc_pos0": [(1, 0.25), (2, 0.5), (3, 0.75)],
    }
    assert tensorboard_scalars(root / "eval") == {"eval/serving_acceptance_length": [(3, 2.5)]}


@needs_tensorboard
def test_a_resumed_writer_hides_the_steps_it_redoes(tmp_path: Path) -> None:
    """A trainer resumed from the checkpoint of step 2 logs steps 3.. again: TensorBoard shows
    the new values only, not both attempts."""
    spec = spec_with(tmp_path, backend="tensorboard")
    first = open_tracker(spec, "train", first_step=0)
    for step in (1, 2, 3, 4):
        first.log_scalars(step, {"train/loss": float(step)})
    first.close()
    resumed = open_tracker(spec, "train", first_step=3)
    for step in (3, 4, 5):
        resumed.log_scalars(step, {"train/loss": 10.0 * step})
    resumed.close()
    assert tensorboard_scalars(tensorboard_dir(spec) / "train") == {
        "train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    }


@pytest.mark.parametrize(
    ("backend", "modules"),
    [
        ("wandb", ["wandb"]),
        ("mlflow", ["mlflow", "mlflow.entities", "mlflow.exceptions", "mlflow.tracking"]),
        ("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
    ],
)
def test_a_missing_extra_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, modules: list[str]
) -> None:
    for name in modules:  # absent whether or not this machine has the package
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TrackingUnavailable) as caught:
        open_tracker(spec_with(tmp_path, backend=backend), "train")
    message = str(caught.value)
    assert f"pip install 'specforge-services[{backend}]'" in message
    assert f"tracking.backend = {backend!r}" in message


def test_the_optional_backends_are_imported_only_when_selected() -> None:
    code = (
        "import sys, specforge_common.tracking, specforge_trainer.loop, "
        "specforge_evaluator.service\n"
        "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "[]"


class _Failing:
    """A backend that loses its server after opening."""

    def log_scalars(self, step, scalars) -> None:
        raise ConnectionError("tracking server gone")

    def close(self) -> None:
        raise ConnectionError("tracking server gone")


def test_a_failing_backend_costs_its_scalars_not_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tracker = Guarded(_Failing(), "mlflow", "train")
    tracker.log_scalars(1, {"train/loss": 1.0})
    tracker.log_scalars(2, {"train/loss": 1.0})
    tracker.close()
    assert tracker.failures == 2
    err = capsys.readouterr().err
    assert err.count("scalars not tracked") == 1 and "tracking server gone" in err
