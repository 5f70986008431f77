"""The trainer's scalars in TensorBoard, read back as TensorBoard reads them (rank 0, a tiny run
against the real nats-server)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from specforge_common.bus import Bus
from specforge_common.contracts import TrackingSpec
from specforge_common.targets import make_tiny_target
from specforge_common.tracking import tensorboard_dir
from specforge_trainer.loop import Trainer, TrainerError
from tests.support import seed_captured_run, tensorboard_scalars, tiny_run_spec
from tests.trainer import train_spec

K = 3  # train_spec's ttt_length


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="the tensorboard extra is not installed")  # fmt: skip
async def test_every_log_window_is_in_tensorboard_at_its_optimizer_step(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(epochs=2, log_every=2),
                         tracking=TrackingSpec(backend="tensorboard"))  # fmt: skip
    await seed_captured_run(bus, spec, n_train=8, n_eval=2)
    result = await Trainer(bus, run_id).run()

    # 8 samples / batch 2 = 4 steps per epoch, 2 epochs, a log line every 2 steps
    assert result.step == 8
    logged = [int(h["step"]) for h in result.history]
    assert logged == [2, 4, 6, 8]
    scalars = tensorboard_scalars(tensorboard_dir(spec) / "train")
    expected = {"loss", "lr", "grad_norm", "acc", "simulated_acc_len", "samples_per_s",
                "tokens_per_s", "data_wait", "epoch",
                *(f"acc_pos{k}" for k in range(K))}  # fmt: skip
    assert set(scalars) == {f"train/{name}" for name in expected}
    for tag, points in scalars.items():
        assert [step for step, _ in points] == logged, tag
    # the values are the log lines' (float32 in the event file)
    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx(
            [h[name] for h in result.history], rel=1e-6
        )
    assert [v for _, v in scalars["train/acc_pos2"]] == pytest.approx(
        [h["acc_2"] for h in result.history], rel=1e-6
    )
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/loss"])
    for k in range(K):
        assert all(0.0 <= v <= 1.0 for _, v in scalars[f"train/acc_pos{k}"])
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"])
    assert not (tensorboard_dir(spec) / "eval").exists()


async def test_a_backend_that_is_not_installed_stops_the_trainer_with_the_pip_command(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # absent, whatever this machine has
    spec = tiny_run_spec(run_id, target, tmp_path, tracking=TrackingSpec(backend="wandb"))
    await seed_captured_run(bus, spec, n_train=2, n_eval=1)
    with pytest.raises(TrainerError, match=r"pip install 'specforge-services\[wandb\]'"):
        await Trainer(bus, run_id).run()
    assert not list((tmp_path / "runs" / run_id).glob("checkpoints/step-*"))  # nothing trained
