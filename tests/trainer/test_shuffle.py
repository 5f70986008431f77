"""Epoch shuffle in the trainer (``TrainSpec.shuffle_window``): epoch 0 in stream order, later
epochs seeded permutations; the same seed trains the same order to the same weights, and a
resume inside a shuffled epoch goes on with the order the uninterrupted run had."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.step_log import read_step_log, trained_samples_path
from specforge_common.targets import make_tiny_target
from specforge_trainer.checkpoints import LATEST_NAME, CheckpointManager
from specforge_trainer.loop import Trainer
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import train_spec

# 8 samples / batch 2 = 4 steps per epoch, 3 epochs = 12 steps.
SHUFFLED = dict(epochs=3, shuffle_window=4, keep_last=100, keep_unevaluated=False)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def trained(workdir: Path, run_id: str, prompt_of: dict[str, str]) -> list[tuple]:
    """(step, epoch, prompt ids) per optimizer step, from the run's trained-samples log."""
    entries = read_step_log(trained_samples_path(workdir / "runs", run_id))
    return [(e["step"], e["epoch"], [prompt_of[s] for s in e["samples"]]) for e in entries]


def epoch_orders(log: list[tuple]) -> dict[int, list[str]]:
    orders: dict[int, list[str]] = {}
    for _, epoch, prompts in log:
        orders.setdefault(epoch, []).extend(prompts)
    return orders


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


async def test_later_epochs_are_seeded_permutations_and_the_same_seed_repeats(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    prompt_of: dict[str, str] = {}
    finals, logs = [], []
    for rid in (f"{run_id}-a", f"{run_id}-b"):  # identical samples and seed, two run ids
        spec = tiny_run_spec(rid, target, tmp_path, train=train_spec(**SHUFFLED))
        refs = await seed_captured_run(bus, spec, n_train=8, n_eval=1, seed=7)
        prompt_of |= {r.sample_id: r.prompt_id for r in refs["train"]}
        result = await Trainer(bus, rid).run()
        assert result.step == 12 and result.samples_consumed == 24
        finals.append(load_file(result.final.path / WEIGHTS_NAME))
        logs.append(trained(tmp_path, rid, prompt_of))

    orders = epoch_orders(logs[0])
    stream_order = [f"p{i}" for i in range(8)]
    assert sorted(orders) == [0, 1, 2]
    assert orders[0] == stream_order
    for epoch in (1, 2):
        assert sorted(orders[epoch]) == sorted(stream_order)
    assert len({tuple(o) for o in orders.values()}) == 3  # three different orders
    assert logs[0] == logs[1]
    assert_same_tensors(finals[0], finals[1])


@pytest.mark.parametrize("resume_step", [5, 6])
async def test_resume_inside_a_shuffled_epoch_matches_the_uninterrupted_run(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, resume_step: int
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path,
                         train=train_spec(checkpoint_every=1, **SHUFFLED))  # fmt: skip
    refs = await seed_captured_run(bus, spec, n_train=8, n_eval=1, seed=7)
    prompt_of = {r.sample_id: r.prompt_id for r in refs["train"]}
    first = await Trainer(bus, run_id).run()
    expected = load_file(first.final.path / WEIGHTS_NAME)
    expected_log = trained(tmp_path, run_id, prompt_of)
    assert epoch_orders(expected_log)[1] != [f"p{i}" for i in range(8)]

    # Back to a checkpoint inside epoch 1 (steps 5..8), then resume from it.
    root = tmp_path / "runs" / run_id / "checkpoints"
    (root / LATEST_NAME).write_text(f"step-{resume_step:08d}\n")
    state = CheckpointManager.read_state(root / f"step-{resume_step:08d}")
    assert state["epoch"] == 1 and state["epoch_index_by_rank"]["0"] == 2 * (resume_step - 4) - 1
    result = await Trainer(bus, run_id, resume=True).run()
    assert result.resumed_from == resume_step and result.step == 12
    assert result.samples_consumed == 24
    assert_same_tensors(expected, load_file(result.final.path / WEIGHTS_NAME))
    assert trained(tmp_path, run_id, prompt_of) == expected_log
