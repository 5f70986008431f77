"""Exact resume: a ``specforge train`` killed with SIGKILL mid-run and restarted ends bit-identical
to an uninterrupted run, having trained exactly the same samples; mismatched resumes refuse."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, DraftSpec, TrainerProgress
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.step_log import read_step_log, train_metrics_path, trained_samples_path
from specforge_common.subjects import progress_key
from specforge_common.targets import make_tiny_target
from specforge_trainer.checkpoints import LATEST_NAME, STATE_FORMAT, STATE_NAME, CheckpointManager
from specforge_trainer.loop import Trainer, TrainerError
from tests.support import TINY_DFLASH, seed_captured_run, tiny_run_spec
from tests.trainer import stream_records, train_spec
from tests.trainer.test_command import train_command


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def checkpoints_dir(workdir: Path, run_id: str) -> Path:
    return workdir / "runs" / run_id / "checkpoints"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def flat_tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict/list (an optimizer state_dict), by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        if isinstance(value, dict | list | tuple | torch.Tensor):
            out |= flat_tensors(value, f"{prefix}/{key}")
    return out


def trained_prompts(workdir: Path, run_id: str, prompt_of: dict[str, str]) -> list[tuple]:
    """(step, epoch, prompt ids) per optimizer step, from the run's trained-samples log."""
    entries = read_step_log(trained_samples_path(workdir / "runs", run_id))
    return [(e["step"], e["epoch"], [prompt_of[s] for s in e["samples"]]) for e in entries]


async def run_train(run_id: str, nats_url: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *train_command(run_id, nats_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 180)
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("algorithm", ["eagle3", "dflash"])
async def test_sigkill_mid_run_then_restart_is_bit_identical_to_an_uninterrupted_run(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server, algorithm: str
) -> None:
    # 8 samples / batch 2 = 4 steps per epoch, 12 epochs = 48 steps; a checkpoint every 3.
    train = train_spec(epochs=12, checkpoint_every=3, keep_last=100, keep_unevaluated=False)
    draft = {"dflash": TINY_DFLASH}.get(algorithm, DraftSpec(draft_vocab_size=128))
    ref_id, killed_id = f"{run_id}-ref", run_id
    prompt_of: dict[str, str] = {}
    for rid in (ref_id, killed_id):  # identical samples (same seed) under two run ids
        spec = tiny_run_spec(rid, target, tmp_path, train=train, draft=draft)
        refs = await seed_captured_run(bus, spec, n_train=8, n_eval=1, seed=7)
        prompt_of |= {r.sample_id: r.prompt_id for r in refs["train"]}

    rc, out, err = await run_train(ref_id, nats_server.url)
    assert rc == 0, err
    assert "final draft:" in out

    # Kill -9 once the progress record shows a step that is not a checkpoint step.
    kill_at = random.choice([s for s in range(4, 30) if s % 3])
    proc = await asyncio.create_subprocess_exec(
        *train_command(killed_id, nats_server.url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    observed = None
    try:
        for _ in range(6000):
            progress = await bus.get_record(progress_key(killed_id, 0), TrainerProgress)
            if progress is not None and progress.step >= kill_at and progress.step % 3:
                os.kill(proc.pid, signal.SIGKILL)
                observed = progress.step
                break
            assert proc.returncode is None, (await proc.stderr.read()).decode()[-3000:]
            await asyncio.sleep(0.005)
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert observed is not None and proc.returncode == -signal.SIGKILL
    root = checkpoints_dir(tmp_path, killed_id)
    latest = CheckpointManager(root).latest()
    state = CheckpointManager.read_state(latest)
    assert not state["final"] and state["step"] % 3 == 0 and state["step"] < 48
    logged_before = read_step_log(trained_samples_path(tmp_path / "runs", killed_id))
    assert max(e["step"] for e in logged_before) >= observed  # steps the checkpoint lost

    rc, out, err = await run_train(killed_id, nats_server.url)
    assert rc == 0, err
    assert f"resumed from step {state['step']}" in out and "final draft:" in out

    ref_final = checkpoints_dir(tmp_path, ref_id) / "step-00000048"
    final = root / "step-00000048"
    assert_same_tensors(load_file(ref_final / WEIGHTS_NAME),
                        load_file(final / WEIGHTS_NAME))  # fmt: skip
    ref_opt = CheckpointManager.read_tensors(ref_final)["optimizer"]
    opt = CheckpointManager.read_tensors(final)["optimizer"]
    assert_same_tensors(flat_tensors(ref_opt), flat_tensors(opt))
    # The same samples, in the same batches, at the same steps; nothing twice, nothing skipped.
    ref_trained = trained_prompts(tmp_path, ref_id, prompt_of)
    trained = trained_prompts(tmp_path, killed_id, prompt_of)
    assert [s for s, _, _ in trained] == list(range(1, 49))
    assert trained == ref_trained
    assert sorted(p for _, _, ps in trained for p in ps) == sorted(
        p for _, _, ps in ref_trained for p in ps)  # fmt: skip
    events = [e for _, e in await stream_records(bus, killed_id, "checkpoints", CheckpointEvent)]
    assert [e.step for e in events] == list(range(0, 49, 3))  # each checkpoint announced once
    assert [e.final for e in events][-1] and not any(e.final for e in events[:-1])

    # A finished run restarted: says so, exits 0, trains nothing.
    rc, out, err = await run_train(killed_id, nats_server.url)
    assert rc == 0, err
    assert f"run {killed_id} is already finished; final draft: {final}" in out
    again = [e for _, e in await stream_records(bus, killed_id, "checkpoints", CheckpointEvent)]
    assert len(again) == len(events)
    assert trained_prompts(tmp_path, killed_id, prompt_of) == ref_trained


@pytest.fixture
async def stopped_run(bus: Bus, run_id: str, target: Path, tmp_path: Path):
    """A finished 4-step run whose ``latest`` is moved back to the non-final step 2."""
    spec = tiny_run_spec(run_id, target, tmp_path,
                         train=train_spec(checkpoint_every=1, keep_last=10))  # fmt: skip
    await seed_captured_run(bus, spec, n_train=8, n_eval=1)
    first = await Trainer(bus, run_id).run()
    root = checkpoints_dir(tmp_path, run_id)
    (root / LATEST_NAME).write_text("step-00000002\n")
    return spec, first, root / "step-00000002"


@pytest.mark.parametrize(
    "field,value",
    [("run_spec_hash", "0123456789abcdef"), ("vocab_map_hash", "feedfacecafebeef"),
     ("world_size", 4), ("strategy", "medusa-ish"), ("parallel", "fsdp")],
)  # fmt: skip
async def test_resume_refuses_another_spec_vocab_world_strategy_or_parallelism(
    bus: Bus, run_id: str, stopped_run, field: str, value
) -> None:
    spec, _, step_dir = stopped_run
    state_path = step_dir / STATE_NAME
    state = json.loads(state_path.read_text())
    mine = {"run_spec_hash": spec.spec_hash(), "vocab_map_hash": state["vocab_map_hash"],
            "world_size": 1, "strategy": spec.draft.strategy, "parallel": "ddp"}[field]  # fmt: skip
    assert state[field] == mine
    state_path.write_text(json.dumps(state | {field: value}))
    with pytest.raises(TrainerError) as info:
        await Trainer(bus, run_id, resume=True).run()
    message = str(info.value)
    assert field.replace("_", " ") in message and repr(value) in message and repr(mine) in message


async def test_resume_refuses_a_checkpoint_of_another_state_format(
    bus: Bus, run_id: str, stopped_run
) -> None:
    _, _, step_dir = stopped_run
    state_path = step_dir / STATE_NAME
    state = json.loads(state_path.read_text())
    assert state["format"] == STATE_FORMAT
    state_path.write_text(json.dumps(state | {"format": STATE_FORMAT - 1}))
    with pytest.raises(TrainerError) as info:
        await Trainer(bus, run_id, resume=True).run()
    assert f"format {STATE_FORMAT - 1}" in str(info.value)
    assert f"reads format {STATE_FORMAT}" in str(info.value)


async def test_in_process_resume_matches_the_uninterrupted_weights(
    bus: Bus, run_id: str, stopped_run, tmp_path: Path
) -> None:
    _, first, step_dir = stopped_run
    expected = load_file(first.final.path / WEIGHTS_NAME)
    trainer = Trainer(bus, run_id, resume=True)
    result = await trainer.run()
    assert result.resumed_from == 2 and result.step == 4 and not result.already_finished
    assert result.samples_consumed == 8 and len(result.history) == 2
    assert_same_tensors(expected, load_file(result.final.path / WEIGHTS_NAME))
    log = read_step_log(trained_samples_path(tmp_path / "runs", run_id))
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    # the metrics log was cut back to step 2 too, then went on: each step once, the first run's
    # losses for steps 1-2 and the resumed run's for 3-4 (both equal the uninterrupted ones)
    metrics = read_step_log(train_metrics_path(tmp_path / "runs", run_id))
    assert [e["step"] for e in metrics] == [1, 2, 3, 4]
    assert [e["loss"] for e in metrics] == [h["loss"] for h in first.history]
    assert [e["loss"] for e in metrics[2:]] == [h["loss"] for h in result.history]
    again = await Trainer(bus, run_id, resume=True).run()
    assert again.already_finished and again.step == 4 and again.final.path == result.final.path
