"""CheckpointManager's best pointer: choice, atomic files, and rotation that spares it; the model
card every checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_common.contracts import CheckpointEvent, EvalResult, RunSpec, TargetSpec
from specforge_common.durable import sha256_file, write_atomic
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.model_card import (
    CARD_NAME,
    ModelCardFacts,
    read_card_facts,
    render_model_card,
)
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
from specforge_common.targets import make_tiny_target
from specforge_trainer import checkpoints as checkpoints_module
from specforge_trainer.checkpoints import (
    BEST_META_NAME,
    BEST_NAME,
    LATEST_NAME,
    CheckpointManager,
    SavedCheckpoint,
)
from specforge_trainer.loop import Trainer
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import stream_records, train_spec


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


# --- the model card (README.md) of every checkpoint ------------------------------------------


def card_facts(step: int = 0) -> ModelCardFacts:
    spec = RunSpec(run_id="r", target=TargetSpec(path="/models/target"))
    return ModelCardFacts.from_spec(spec, step=step, final=False, samples_trained=12,
                                    tokens_trained=345, sources=["data.jsonl"])  # fmt: skip


def test_a_checkpoint_carries_its_card_and_a_card_rewrite_keeps_the_weights_identity(
    tmp_path: Path, draft: Eagle3Draft
) -> None:
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=10)
    saved = manager.save(draft, 7, {"samples_consumed": 12}, final=True, card=card_facts())
    card = saved.path / CARD_NAME
    text = card.read_text()
    assert "Not evaluated yet" in text and hidden_files(manager.root) == []
    facts = read_card_facts(saved.path)
    assert facts is not None
    # completed by the manager: the step, finality, the weights' sha256 and the exported config
    assert (facts.step, facts.final, facts.weights_sha256) == (7, True, saved.sha256)
    assert saved.sha256 == sha256_file(saved.path / WEIGHTS_NAME)
    config = json.loads((saved.path / "config.json").read_text())
    assert (facts.hidden_size, facts.draft_vocab_size) == (16, 32)
    assert (config["hidden_size"], config["draft_vocab_size"]) == (16, 32)
    assert (facts.samples_trained, facts.tokens_trained) == (12, 345)
    assert facts.sources == ("data.jsonl",)
    # the command serves the step dir itself, never the staging dir the card was written in
    assert f"--speculative-draft-model-path {saved.path} " in text and ".staging" not in text

    # the evaluator's rewrite: the card changes, the weights (and their sha256) do not
    evaluated = EvalResult(run_id="r", step=7, checkpoint_sha256=saved.sha256,
                           acceptance_rates=[0.5, 0.25], simulated_acceptance_length=0.625,
                           serving_acceptance_length=1.75, serving_acceptance_rates=[0.6, 0.4],
                           lossless=True, run_spec_hash="h")  # fmt: skip
    write_atomic(card, render_model_card(facts, evaluated, draft_dir=saved.path))
    assert "**Serving acceptance length: 1.750**" in card.read_text()
    assert sha256_file(saved.path / WEIGHTS_NAME) == saved.sha256
    assert manager.update_best([evaluated]) == saved.path  # still the weights that were scored


def test_a_card_that_cannot_be_written_does_not_cost_the_checkpoint(
    tmp_path: Path, draft: Eagle3Draft, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no card today")

    monkeypatch.setattr(checkpoints_module, "render_model_card", broken)
    manager = CheckpointManager(tmp_path / "ckpts")
    saved = manager.save(draft, 1, {"samples_consumed": 1}, card=card_facts())
    assert saved.path.is_dir() and not (saved.path / CARD_NAME).exists()
    assert manager.step_dirs() == {1: saved.path} and hidden_files(manager.root) == []
    assert manager.latest() == saved.path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


async def test_the_trainer_writes_cards_with_samples_and_tokens_and_a_resume_keeps_counting(
    bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path,
                         train=train_spec(checkpoint_every=2, keep_last=10))  # fmt: skip
    refs = await seed_captured_run(bus, spec, n_train=8, n_eval=1)
    tokens = [ref.num_tokens for ref in refs["train"]]  # batches of 2, in stream order
    first = await Trainer(bus, run_id).run()
    assert first.step == 4
    root = tmp_path / "runs" / run_id / "checkpoints"
    events = {e.step: e for _, e in await stream_records(bus, run_id, "checkpoints",
                                                        CheckpointEvent)}  # fmt: skip
    assert sorted(events) == [0, 2, 4]
    for step, event in events.items():
        step_dir = root / f"step-{step:08d}"
        facts = read_card_facts(step_dir)
        assert facts is not None, step
        assert (facts.step, facts.final, facts.run_id) == (step, step == 4, run_id)
        assert facts.samples_trained == 2 * step
        assert facts.tokens_trained == sum(tokens[: 2 * step])
        assert CheckpointManager.read_state(step_dir)["tokens_trained"] == facts.tokens_trained
        assert facts.sources == ("seed",) and facts.spec_hash == spec.spec_hash()
        assert facts.weights_sha256 == event.checkpoint_sha256
        assert facts.target == str(target) and facts.ttt_length == spec.train.ttt_length
        assert (facts.train_loss is None) == (step == 0)
        text = (step_dir / CARD_NAME).read_text()
        assert "Not evaluated yet" in text
        assert f"--speculative-draft-model-path {step_dir} --speculative-num-steps 3" in text

    # resumed from step 2: the tokens trained before the resume still count
    (root / LATEST_NAME).write_text("step-00000002\n")
    again = await Trainer(bus, run_id, resume=True).run()
    assert again.resumed_from == 2 and again.step == 4
    facts = read_card_facts(root / "step-00000004")
    assert facts is not None and facts.final
    assert (facts.samples_trained, facts.tokens_trained) == (8, sum(tokens))
