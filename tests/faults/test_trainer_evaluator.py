"""Trainer killed mid-step and mid-checkpoint-write; evaluator killed mid-evaluation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specforge_common.bus import Bus
from specforge_common.contracts import CheckpointEvent, EvalResult
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.step_log import read_step_log, trained_samples_path
from specforge_common.targets import make_tiny_target
from specforge_trainer.checkpoints import CheckpointManager
from tests.evaluator import build_draft, publish_checkpoint, read_stream, vocab_map_of_run
from tests.faults import KILLED, leftovers, run
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import stream_records, train_spec

# 8 samples / batch 2 = 4 steps an epoch, 3 epochs = 12 steps; a checkpoint every 3 steps.
EPOCHS, STEPS, EVERY = 3, 12, 3


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("faults-train"), arch="llama", seed=0)


def train_args(run_id: str, url: str) -> list[str]:
    return ["--run", run_id, "--nats", url, "--spec-timeout", "20"]


def trained(workdir: Path, run_id: str, prompt_of: dict[str, str]) -> list[tuple]:
    """(step, epoch, prompt ids) per optimizer step, from the trained-samples log."""
    entries = read_step_log(trained_samples_path(workdir / "runs", run_id))
    return [(e["step"], e["epoch"], [prompt_of[s] for s in e["samples"]]) for e in entries]


def final_weights(workdir: Path, run_id: str) -> dict[str, torch.Tensor]:
    root = workdir / "runs" / run_id / "checkpoints"
    state = CheckpointManager.read_state(CheckpointManager(root).latest())
    assert state["final"] and state["step"] == STEPS
    return load_file(root / f"step-{STEPS:08d}" / WEIGHTS_NAME)


async def seed_pair(bus: Bus, run_id: str, target: Path, tmp_path: Path) -> dict[str, str]:
    """The same captured samples under ``<run>-ref`` and ``<run>``; sample id -> prompt id."""
    train = train_spec(epochs=EPOCHS, checkpoint_every=EVERY, keep_last=100)
    prompt_of: dict[str, str] = {}
    for rid in (f"{run_id}-ref", run_id):
        refs = await seed_captured_run(bus, tiny_run_spec(rid, target, tmp_path, train=train),
                                       n_train=8, n_eval=1, seed=7)  # fmt: skip
        prompt_of |= {r.sample_id: r.prompt_id for r in refs["train"]}
    return prompt_of


@pytest.mark.parametrize(
    "fault",
    ["trainer.mid_step@5",
     pytest.param("trainer.mid_checkpoint@3", marks=pytest.mark.faults),
     pytest.param("trainer.mid_checkpoint@5", marks=pytest.mark.faults)],
)  # fmt: skip
async def test_trainer_killed_then_resumed_ends_bit_identical_to_a_fault_free_run(
    fault: str, bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    """mid_step@5: weights stepped, position not yet advanced. mid_checkpoint@3 / @5: the
    step-6 / final checkpoint's staging dir written, ``latest`` still the previous one."""
    prompt_of = await seed_pair(bus, run_id, target, tmp_path)
    code, _, err = await run("train", *train_args(f"{run_id}-ref", nats_server.url))
    assert code == 0, err[-3000:]
    code, _, err = await run("train", *train_args(run_id, nats_server.url), fault=fault)
    assert code == KILLED, err[-3000:]
    root = tmp_path / "runs" / run_id / "checkpoints"
    state = CheckpointManager.read_state(CheckpointManager(root).latest())
    assert not state["final"]
    code, out, err = await run("train", *train_args(run_id, nats_server.url))
    assert code == 0, err[-3000:]
    assert f"resumed from step {state['step']}" in out
    assert not [p for p in root.iterdir() if "staging" in p.name]  # the torn write is gone

    ref = final_weights(tmp_path, f"{run_id}-ref")
    got = final_weights(tmp_path, run_id)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref_log, log = (trained(tmp_path, r, prompt_of) for r in (f"{run_id}-ref", run_id))
    assert [s for s, _, _ in log] == list(range(1, STEPS + 1)) and log == ref_log
    per_prompt = Counter(p for _, _, ps in log for p in ps)
    assert len(per_prompt) == 8 and set(per_prompt.values()) == {EPOCHS}  # each sample 3x
    events = [e for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)]
    assert [e.step for e in events] == list(range(0, STEPS + 1, EVERY))  # each announced once


@pytest.mark.faults
async def test_evaluator_killed_mid_evaluation_publishes_each_result_once(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    """Killed after evaluating step 4, before publishing: step 4 is redelivered to the next
    evaluator after the ack wait; steps 0 and 4 each get exactly one EvalResult."""
    torch.set_num_threads(1)
    spec = tiny_run_spec(run_id, target, tmp_path)
    await seed_captured_run(bus, spec, n_train=4, n_eval=3)
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    await publish_checkpoint(bus, spec, draft, 0)
    await publish_checkpoint(bus, spec, draft, 4, final=True)
    args = ["--run", run_id, "--nats", nats_server.url, "--exit-when-final"]
    code, _, err = await run("evaluate", *args, fault="evaluator.mid_eval@2")
    assert code == KILLED, err[-3000:]
    assert [r.step for r in await read_stream(bus, run_id, "evals", EvalResult)] == [0]
    code, _, err = await run("evaluate", *args)
    assert code == 0, err[-3000:]
    results = await read_stream(bus, run_id, "evals", EvalResult)
    assert [r.step for r in results] == [0, 4]
    assert not leftovers(tmp_path / "features")
