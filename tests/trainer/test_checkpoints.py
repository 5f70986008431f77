"""CheckpointManager's best pointer: choice, atomic files, and rotation that spares it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_common.contracts import EvalResult
from specforge_common.durable import sha256_file
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
from specforge_trainer.checkpoints import (
    BEST_META_NAME,
    BEST_NAME,
    LATEST_NAME,
    CheckpointManager,
    SavedCheckpoint,
)


@pytest.fixture
def draft() -> Eagle3Draft:
    config = Eagle3Config(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=32, draft_vocab_size=32)  # fmt: skip
    torch.manual_seed(0)
    model = Eagle3Draft(config)
    model.t2d.fill_(True)
    return model


def save_steps(manager: CheckpointManager, draft: Eagle3Draft, steps) -> dict[int, SavedCheckpoint]:
    saved = {}
    for step in steps:
        with torch.no_grad():
            draft.fc.weight.add_(0.01)  # each step's weights (and sha256) differ
        saved[step] = manager.save(draft, step, {"samples_consumed": step})
    return saved


def result(saved: SavedCheckpoint, sal: float | None, sha256: str | None = None) -> EvalResult:
    return EvalResult(run_id="r", step=saved.step, checkpoint_sha256=sha256 or saved.sha256,
                      acceptance_rates=[0.5, 0.25], simulated_acceptance_length=sal,
                      run_spec_hash="h")  # fmt: skip


def hidden_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_best_is_the_highest_acceptance_with_ties_to_the_earlier_step(
    tmp_path: Path, draft: Eagle3Draft
) -> None:
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=10)
    saved = save_steps(manager, draft, range(5))
    evals = [result(saved[0], 0.1), result(saved[1], 1.5), result(saved[2], 0.9),
             result(saved[3], 1.5), result(saved[4], None)]  # fmt: skip
    assert manager.update_best(evals) == saved[1].path
    assert manager.best() == saved[1].path
    assert (manager.root / BEST_NAME).read_text() == "step-00000001\n"
    meta = json.loads((manager.root / BEST_META_NAME).read_text())
    assert meta["step"] == 1
    assert meta["simulated_acceptance_length"] == 1.5
    assert meta["acceptance_rates"] == [0.5, 0.25]
    assert meta["checkpoint_sha256"] == saved[1].sha256 == sha256_file(saved[1].path / WEIGHTS_NAME)
    assert manager.best_meta() == meta
    assert hidden_files(manager.root) == []  # no temp files left behind

    # a better result moves the pointer
    assert manager.update_best([*evals, result(saved[4], 2.0)]) == saved[4].path
    assert manager.best_meta()["step"] == 4
    assert hidden_files(manager.root) == []


def test_best_ignores_missing_results_missing_dirs_and_other_weights(
    tmp_path: Path, draft: Eagle3Draft
) -> None:
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=10)
    saved = save_steps(manager, draft, range(4))
    assert manager.update_best([]) is None
    assert manager.update_best([result(saved[1], None), result(saved[2], float("nan"))]) is None
    assert manager.best() is None and manager.best_meta() is None

    ghost = EvalResult(run_id="r", step=7, checkpoint_sha256="0" * 64, acceptance_rates=[],
                       simulated_acceptance_length=9.0, run_spec_hash="h")  # fmt: skip
    stale = result(saved[3], 8.0, sha256="f" * 64)  # scored other weights saved as step 3
    assert manager.update_best([ghost, stale, result(saved[2], 1.0)]) == saved[2].path

    # the step dir of the best one disappears: the next best still on disk takes over
    for path in saved[2].path.iterdir():
        path.unlink()
    saved[2].path.rmdir()
    evals = [ghost, stale, result(saved[2], 1.0), result(saved[1], 0.5)]
    assert manager.update_best(evals) == saved[1].path
    assert manager.best_meta()["step"] == 1


def test_without_usable_results_a_still_valid_best_is_kept_else_cleared(
    tmp_path: Path, draft: Eagle3Draft
) -> None:
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=10)
    saved = save_steps(manager, draft, range(3))
    assert manager.update_best([result(saved[1], 1.0)]) == saved[1].path
    assert manager.update_best([]) == saved[1].path  # its weights are still the scored ones
    assert manager.best() == saved[1].path

    with torch.no_grad():
        draft.fc.weight.add_(1.0)
    manager.save(draft, 1, {"samples_consumed": 1})  # step 1 re-saved with other weights
    assert manager.update_best([result(saved[1], 1.0)]) is None
    assert manager.best() is None and manager.best_meta() is None
    assert hidden_files(manager.root) == []


def test_rotation_never_deletes_the_best_checkpoint(tmp_path: Path, draft: Eagle3Draft) -> None:
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    saved = save_steps(manager, draft, range(3))
    assert manager.update_best([result(saved[1], 2.0), result(saved[2], 1.0)]) == saved[1].path
    more = save_steps(manager, draft, range(3, 7))
    assert sorted(manager.step_dirs()) == [0, 1, 5, 6]  # newest two, step 0 and the best
    assert manager.best() == saved[1].path and saved[1].path.is_dir()

    # the best moves on: the old best is rotated out at the next save, the new one stays
    evals = [result(saved[1], 2.0), result(more[5], 3.0)]
    assert manager.update_best(evals) == more[5].path
    save_steps(manager, draft, range(7, 10))
    assert sorted(manager.step_dirs()) == [0, 5, 8, 9]
    assert manager.best() == more[5].path


def test_leftover_temp_files_of_a_crashed_write_are_removed(
    tmp_path: Path, draft: Eagle3Draft
) -> None:
    root = tmp_path / "ckpts"
    root.mkdir()
    (root / ".best.123.abcd.tmp").write_text("step-0000")
    (root / ".latest.123.abcd.tmp").write_text("step-0000")
    staging = root / ".step-00000001.123.abcd.staging"  # a save cut short ...
    staging.mkdir()
    (root / f".{staging.name}.123.ef01.tmp").mkdir()  # ... inside save_draft's own temp dir
    manager = CheckpointManager(root)
    assert hidden_files(root) == []
    assert sorted(p.name for p in root.iterdir()) == []
    saved = save_steps(manager, draft, [0])
    assert manager.update_best([result(saved[0], 0.0)]) == saved[0].path
    assert sorted(p.name for p in root.iterdir()) == [BEST_NAME, BEST_META_NAME, LATEST_NAME,
                                                      "step-00000000"]  # fmt: skip
