"""The trainer end to end on a tiny target: real nats-server, real store, real torch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus
from specforge_common.contracts import (
    CheckpointEvent,
    EndOfSplit,
    EvalResult,
    SampleRef,
    TrainerProgress,
)
from specforge_common.durable import sha256_file
from specforge_common.eagle3 import VocabMap, load_draft
from specforge_common.eagle3.layout import CONFIG_NAME, WEIGHTS_NAME
from specforge_common.featurestore import open_store
from specforge_common.model_card import CARD_NAME
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
from specforge_common.subjects import RunSubjects, enqueue_key, progress_key
from specforge_common.targets import load_embedding, make_tiny_target
from specforge_trainer.checkpoints import LATEST_NAME, STATE_NAME, TENSORS_NAME, CheckpointManager
from specforge_trainer.loop import Trainer, TrainerError
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import drop_end_markers, stream_records, train_spec

SAMPLES = SampleRef | EndOfSplit


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


async def vocab_map_of_run(bus: Bus, spec) -> VocabMap:
    from specforge_common.contracts import EnqueueSummary

    summary = await bus.get_record(enqueue_key(spec.run_id), EnqueueSummary)
    tensors = open_store(spec.store_uri).get(summary.vocab_map)
    return VocabMap(d2t=tensors["d2t"], t2d=tensors["t2d"])


def teacher_entropy_floor(trainer: Trainer, locations, spec) -> float:
    """The lowest loss any draft can reach on a batch: ``sum_k decay^k * H(teacher_k)``."""
    from specforge_common.eagle3.teacher import prepare_teacher, shift_left
    from specforge_trainer.data import collate

    store = open_store(spec.store_uri)
    batch = collate([store.get(location) for location in locations])
    K = spec.train.ttt_length
    teacher = prepare_teacher(batch, trainer.parts.head, trainer.parts.draft.t2d, K)
    B, T = batch.input_ids.shape
    floor, mask = 0.0, teacher.position_mask
    for k in range(K):
        p = teacher.target_p[:, k : k + T]
        floor += 0.8**k * float((mask * -(p * p.log()).sum(-1)).sum()) / (B * T)
        mask = shift_left(mask)
    return floor


async def test_training_learns_and_publishes_checkpoints_events_and_progress(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(epochs=6, keep_last=10))
    refs = await seed_captured_run(bus, spec, n_train=8, n_eval=2)
    trainer = Trainer(bus, run_id)
    result = await trainer.run()

    # 8 samples / batch 2 = 4 steps per epoch, 6 epochs; each epoch sees the same 4 batches.
    assert (result.step, result.samples_consumed, result.stopped) == (24, 48, False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 24
    first, last = losses[:4], losses[-4:]
    assert all(b < a for a, b in zip(first, last, strict=True)), (first, last)
    # The tiny target's teacher is nearly uniform, so the loss cannot fall below the teacher's
    # entropy; of what can be learned on the first batch, most is learned.
    floor = teacher_entropy_floor(trainer, [r.features for r in refs["train"][:2]], spec)
    assert first[0] - floor > 0.004 and last[0] - floor < 0.5 * (first[0] - floor)
    assert {"lr", "grad_norm", "acc_0", "acc_2", "simulated_acc_len", "samples_per_s",
            "tokens_per_s", "data_wait"} <= result.history[0].keys()  # fmt: skip
    assert 0.0 <= result.data_wait_fraction < 1.0

    # Checkpoints: step 0, every 4 steps, the final one; SGLang layout + trainer_state.json.
    root = tmp_path / "runs" / run_id / "checkpoints"
    assert step_dirs(root) == [f"step-{s:08d}" for s in range(0, 25, 4)]
    assert (root / LATEST_NAME).read_text().strip() == "step-00000024"
    final_dir = root / "step-00000024"
    assert result.final is not None and result.final.path == final_dir
    assert sorted(p.name for p in final_dir.iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, TENSORS_NAME, CARD_NAME])  # fmt: skip
    vocab_map = await vocab_map_of_run(bus, spec)
    loaded = load_draft(final_dir, embedding=load_embedding(target), vocab_map=vocab_map)
    trained = trainer.parts.draft.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    state = json.loads((final_dir / STATE_NAME).read_text())
    last_train_seq = result.last_sequence
    assert state["step"] == 24 and state["final"] is True and state["samples_consumed"] == 48
    assert state["last_sequence"] == last_train_seq
    assert state["vocab_map_hash"] == vocab_map.hash()
    assert state["run_spec_hash"] == spec.spec_hash()
    assert state["metrics"]["loss"] == pytest.approx(losses[-1])
    untrained = load_file(root / "step-00000000" / WEIGHTS_NAME)
    assert not torch.equal(untrained["fc.weight"], trained["fc.weight"])

    # CheckpointEvents: one per dir, final only on the last.
    events = [e for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)]
    assert [e.step for e in events] == list(range(0, 25, 4))
    assert [e.final for e in events] == [False] * 6 + [True]
    for event in events:
        path = Path(event.checkpoint_uri)
        assert path.is_absolute() and path == root / f"step-{event.step:08d}"
        assert event.checkpoint_sha256 == sha256_file(path / WEIGHTS_NAME)
        assert event.samples_consumed == 2 * event.step
        assert event.run_spec_hash == spec.spec_hash() and event.run_id == run_id
        assert (event.metrics == {}) == (event.step == 0)
    assert events[-1].last_sequence == {0: last_train_seq}
    assert events[-1].metrics["loss"] == pytest.approx(losses[-1])

    train_seqs = [seq for seq, r in await stream_records(bus, run_id, "samples", SAMPLES)
                  if isinstance(r, SampleRef) and r.split == "train"]  # fmt: skip
    assert last_train_seq == train_seqs[-1] and len(train_seqs) == len(refs["train"])
    progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
    assert progress.done and progress.step == 24 and progress.samples_consumed == 48
    assert progress.last_sequence == last_train_seq

    # What a live progress bar shows: the counters above, of the total the schedule planned.
    figures = {f.label: f for f in trainer.progress_figures()}
    assert (figures["step"].value, figures["step"].total, figures["trained"].value) == (24, 24, 48)
    assert figures["accept-len (train)"].value == result.history[-1]["simulated_acc_len"]


async def test_same_stream_and_seed_give_identical_weights(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(epochs=2))
    await seed_captured_run(bus, spec, n_train=6)
    first = await Trainer(bus, run_id).run()
    weights = {k: v.clone() for k, v in load_file(first.final.path / WEIGHTS_NAME).items()}
    second = await Trainer(bus, run_id).run()
    again = load_file(second.final.path / WEIGHTS_NAME)
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]


async def test_train_step_keys_reach_the_strategy_and_change_how_not_what(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    """The same data trained with the reference attention, a 5-token loss chunk, the decoder
    layer recomputed in backward and explicit fp32 gives the default run's losses."""
    default = tiny_run_spec(run_id, target, tmp_path / "a")
    await seed_captured_run(bus, default, n_train=4)
    step_keys = dict(attention="reference", loss_chunk_tokens=5, activation_checkpointing=True,
                     precision="fp32")  # fmt: skip
    other_id = f"{run_id}-keys"
    other = tiny_run_spec(other_id, target, tmp_path / "b", train=train_spec(**step_keys))
    await seed_captured_run(bus, other, n_train=4)
    first = await Trainer(bus, run_id).run()
    trainer = Trainer(bus, other_id)
    second = await trainer.run()
    strategy = trainer.parts.strategy
    assert (strategy.attention, strategy.loss_chunk_tokens, strategy.activation_checkpointing,
            strategy.precision) == ("reference", 5, True, "fp32")  # fmt: skip
    assert trainer.parts.precision == "fp32"
    assert [h["loss"] for h in second.history] == pytest.approx(
        [h["loss"] for h in first.history], rel=1e-5
    )


async def test_bf16_precision_on_a_cpu_is_refused_before_any_work(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(precision="bf16"))
    await bus.ensure_streams(run_id)
    await bus.put_run_spec(spec)
    with pytest.raises(TrainerError, match="train.precision bf16 needs a CUDA device"):
        await Trainer(bus, run_id).run()


async def test_keep_last_rotation_spares_step_zero_and_the_final(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    train = train_spec(epochs=2, checkpoint_every=1, keep_last=2, log_every=3,
                       keep_unevaluated=False)  # fmt: skip
    spec = tiny_run_spec(run_id, target, tmp_path, train=train)
    await seed_captured_run(bus, spec, n_train=6)  # 3 steps per epoch -> 6 steps
    result = await Trainer(bus, run_id).run()
    root = tmp_path / "runs" / run_id / "checkpoints"
    assert result.step == 6
    assert step_dirs(root) == ["step-00000000", "step-00000005", "step-00000006"]
    events = [e for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)]
    assert [e.step for e in events] == [0, 1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in result.history] == [3.0, 6.0]


async def test_checkpoints_without_an_eval_result_are_never_rotated_out(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    train = train_spec(epochs=2, checkpoint_every=1, keep_last=2, log_every=3)
    spec = tiny_run_spec(run_id, target, tmp_path, train=train)
    await seed_captured_run(bus, spec, n_train=6)
    for step in (1, 2):  # the evaluator has scored steps 1 and 2 only
        result = EvalResult(run_id=run_id, step=step, checkpoint_sha256="x", acceptance_rates=[],
                            run_spec_hash=spec.spec_hash())  # fmt: skip
        await bus.publish(RunSubjects(run_id).evals, result, msg_id=f"eval:{run_id}:{step}")
    await Trainer(bus, run_id).run()
    root = tmp_path / "runs" / run_id / "checkpoints"
    assert step_dirs(root) == [f"step-{s:08d}" for s in (0, 3, 4, 5, 6)]


def test_rotation_keeps_final_checkpoints_of_earlier_runs(tmp_path: Path) -> None:
    config = Eagle3Config(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=32, draft_vocab_size=32)  # fmt: skip
    draft = Eagle3Draft(config)
    draft.t2d.fill_(True)
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    for step in range(6):
        saved = manager.save(draft, step, {"samples_consumed": step}, final=step == 2)
        assert manager.latest() == saved.path
    assert sorted(manager.step_dirs()) == [0, 2, 4, 5]
    saved = manager.save(draft, 5, {"samples_consumed": 99})  # a step saved again is replaced
    assert CheckpointManager.read_state(saved.path)["samples_consumed"] == 99
    assert not [p for p in (tmp_path / "ckpts").iterdir() if p.name.startswith(".")]


async def test_gradient_accumulation_counts_optimizer_steps(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path,
                         train=train_spec(accumulation_steps=3, checkpoint_every=100))  # fmt: skip
    await seed_captured_run(bus, spec, n_train=8)  # 4 micro-batches: one full window + one partial
    result = await Trainer(bus, run_id).run()
    assert (result.step, result.samples_consumed) == (2, 8)
    assert [e.step for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)
            ] == [0, 2]  # fmt: skip


async def test_warm_start_begins_from_the_given_draft(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=100))
    await seed_captured_run(bus, spec, n_train=4)
    first = await Trainer(bus, run_id).run()
    warm = tiny_run_spec(f"{run_id}-warm", target, tmp_path, train=spec.train,
                         draft=spec.draft.__class__(draft_vocab_size=spec.draft.draft_vocab_size,
                                                    init_from=str(first.final.path)))  # fmt: skip
    await seed_captured_run(bus, warm, n_train=4)  # same data and seed -> same vocab map
    trainer = Trainer(bus, warm.run_id)
    second = await trainer.run()
    assert second.checkpoints[0].step == 0
    start = load_file(second.checkpoints[0].path / WEIGHTS_NAME)
    given = load_file(first.final.path / WEIGHTS_NAME)
    assert start.keys() == given.keys() and all(torch.equal(start[k], given[k]) for k in start)
    assert not torch.equal(start["fc.weight"], trainer.parts.draft.fc.weight)


async def test_a_stop_request_checkpoints_the_current_step(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=100))
    await seed_captured_run(bus, spec, n_train=8)
    await drop_end_markers(bus, run_id)  # capture "still running": the trainer waits for more
    trainer = Trainer(bus, run_id)
    running = asyncio.create_task(trainer.run())
    for _ in range(200):  # the last batch waits for its look-ahead: 3 steps are trained
        progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
        if progress is not None and progress.step == 3:
            break
        await asyncio.sleep(0.05)
    assert not running.done()
    trainer.request_stop()
    result = await asyncio.wait_for(running, 10)
    assert result.stopped and result.final is None and result.step == 3
    events = [e for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)]
    assert [(e.step, e.final) for e in events] == [(0, False), (3, False)]
    progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
    assert not progress.done and progress.step == 3 and progress.samples_consumed == 6


async def test_a_run_without_train_samples_ends_with_the_step_zero_draft_as_final(
    bus: Bus, run_id: str, target: Path, tmp_path: Path
) -> None:
    spec = tiny_run_spec(run_id, target, tmp_path)
    await seed_captured_run(bus, spec, n_train=0, n_eval=1)
    result = await Trainer(bus, run_id).run()
    assert (result.step, result.samples_consumed, result.stopped) == (0, 0, False)
    assert result.final is not None and result.final.path.name == "step-00000000"
    events = [e for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)]
    assert [(e.step, e.final) for e in events] == [(0, True)]
    progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
    assert progress.done and progress.step == 0


async def test_a_missing_run_spec_is_a_clear_error(bus: Bus, run_id: str) -> None:
    with pytest.raises(TrainerError, match="no run spec"):
        await Trainer(bus, run_id, spec_timeout=0.3).run()
