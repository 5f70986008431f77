"""Data-parallel training: 2 gloo ranks (spawned processes) against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from specforge_common.bus import Bus, BusConfig, open_bus
from specforge_common.contracts import CheckpointEvent, TrainerProgress
from specforge_common.eagle3.layout import WEIGHTS_NAME
from specforge_common.step_log import read_step_log, trained_samples_path
from specforge_common.subjects import progress_key
from specforge_common.targets import make_tiny_target
from specforge_trainer.checkpoints import LATEST_NAME, STATE_NAME
from specforge_trainer.loop import Trainer
from tests.support import seed_captured_run, tiny_run_spec
from tests.trainer import UpdateRecorder, assert_same_training, stream_records, train_spec

WORLD = 2


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _rank_async(
    rank: int, nats_url: str, run_id: str, out: Path, resume: bool, parallel: str
) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    bus = await open_bus(BusConfig(servers=(nats_url,), name=f"test-rank{rank}"))
    async with bus:
        trainer = Trainer(bus, run_id, rank=rank, world_size=WORLD, spec_timeout=20,
                          resume=resume, parallel=parallel)  # fmt: skip
        await trainer.setup()
        assert dist.get_backend() == "gloo"
        assert (trainer.parts.ddp is None) == trainer.parts.fsdp == (parallel == "fsdp")
        calls = [0]

        def counting_hook(state, bucket):  # every gradient all-reduce goes through here
            calls[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        if trainer.parts.ddp is not None:
            trainer.parts.ddp.register_comm_hook(None, counting_hook)
        recorder = UpdateRecorder(trainer)
        result = await trainer.run()
        dist.destroy_process_group()
    grads = out / f"grads-{run_id}-{'resumed' if resume else 'fresh'}"
    if rank == 0:
        grads.mkdir()
        recorder.save(grads)
    report = {"rank": rank, "step": result.step, "allreduces": calls[0],
              "samples": result.samples_consumed, "stopped": result.stopped,
              "final": str(result.final.path) if result.final else None,
              "resumed_from": result.resumed_from, "grads": str(grads),
              "loss": [h["loss"] for h in result.history]}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _rank_main(
    rank: int, port: int, nats_url: str, run_id: str, out: str, resume: bool, parallel: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    asyncio.run(_rank_async(rank, nats_url, run_id, Path(out), resume, parallel))


def run_two_ranks(
    nats_url: str, run_id: str, out: Path, resume: bool = False, parallel: str = "ddp"
) -> list[dict]:
    """Both ranks of ``run_id`` in spawned processes; their reports, by rank."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main,
                         args=(r, port, nats_url, run_id, str(out), resume, parallel))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


async def test_two_ranks_match_single_rank_training_with_one_allreduce_per_step(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    """2 ranks x batch 1 x accumulation 4 == 1 rank x batch 2 x accumulation 4.

    All samples have the same length T, so each rank's loss (a mean over its 1 x T positions)
    averaged by DDP over the 2 ranks is the single rank's loss (a mean over 2 x T):
    ``(L0 + L1) / 2``. Rank r gets split positions r, r+2, ...; the single rank's micro-batch m
    holds positions 2m and 2m+1 — the same two samples as the ranks' micro-step m. So every
    optimizer step sees the same loss and the same gradients, up to fp32 summation order, and
    AdamW makes the same updates (``assert_same_training`` says how that is compared).
    16 samples: 8 micro-steps per rank = 2 optimizer steps = exactly 2 gradient all-reduces
    (the draft's gradients fit one DDP bucket; the other 6 micro-steps run under no_sync).
    """
    spec = tiny_run_spec(run_id, target, tmp_path,
                         train=train_spec(batch_size=1, accumulation_steps=4,
                                          checkpoint_every=100))  # fmt: skip
    await seed_captured_run(bus, spec, n_train=16, n_eval=2, min_len=16, max_len=16)
    reports = await asyncio.to_thread(run_two_ranks, nats_server.url, run_id, tmp_path)
    assert [r["step"] for r in reports] == [2, 2]
    assert [r["allreduces"] for r in reports] == [2, 2]
    assert [r["samples"] for r in reports] == [8, 8]
    assert reports[0]["loss"] == reports[1]["loss"]  # logged metrics are all-reduced
    final = Path(reports[0]["final"])
    assert reports[1]["final"] == str(final) and final.name == "step-00000002"

    single = f"{run_id}-single"
    single_spec = tiny_run_spec(single, target, tmp_path, data_run=run_id,
                                train=train_spec(batch_size=2, accumulation_steps=4,
                                                 checkpoint_every=100))  # fmt: skip
    await bus.ensure_streams(single)
    await bus.put_run_spec(single_spec)
    trainer = Trainer(bus, single)
    await trainer.setup()
    recorder = UpdateRecorder(trainer)
    result = await trainer.run()
    assert result.step == 2 and result.final is not None
    assert [h["loss"] for h in result.history] == pytest.approx(reports[0]["loss"], rel=1e-6)
    ddp_weights, single_weights = load_file(final / WEIGHTS_NAME), load_file(
        result.final.path / WEIGHTS_NAME)  # fmt: skip
    assert ddp_weights.keys() == single_weights.keys()
    initial = load_file(final.parent / "step-00000000" / WEIGHTS_NAME)
    assert_same_training(
        initial,
        (ddp_weights, single_weights),
        (UpdateRecorder.load(Path(reports[0]["grads"])), recorder.steps),
    )
    assert not torch.equal(initial["fc.weight"], ddp_weights["fc.weight"])

    # Only rank 0 checkpoints; the events carry both ranks' positions; each rank reports.
    events = [e for _, e in await stream_records(bus, run_id, "checkpoints", CheckpointEvent)]
    assert [(e.step, e.final) for e in events] == [(0, False), (2, True)]
    assert sorted(events[-1].last_sequence) == [0, 1] and events[-1].samples_consumed == 16
    for rank in range(WORLD):
        progress = await bus.get_record(progress_key(run_id, rank), TrainerProgress)
        assert progress.done and progress.step == 2 and progress.samples_consumed == 8


async def test_ranks_shard_the_split_disjointly_and_take_equal_steps(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    """5 samples, batch 2: rank 0 gets positions 0, 2, 4 (2 batches), rank 1 gets 1, 3 (1
    batch); rank 1 makes a zero-loss step at the end so both make 2 optimizer steps. Resuming
    both ranks from the step-1 checkpoint ends bit-identical, each rank at its own position."""
    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=1))
    refs = await seed_captured_run(bus, spec, n_train=5, n_eval=1)
    reports = await asyncio.to_thread(run_two_ranks, nats_server.url, run_id, tmp_path)
    assert [r["step"] for r in reports] == [2, 2]
    assert [r["samples"] for r in reports] == [3, 2]
    assert [r["allreduces"] for r in reports] == [2, 2]
    trained = []
    for rank in range(WORLD):
        entries = read_step_log(trained_samples_path(spec.output_dir, run_id, rank))
        assert [e["step"] for e in entries] == [1, 2]
        trained.append([s for e in entries for s in e["samples"]])
    split = [r.sample_id for r in refs["train"]]
    assert trained[0] == split[0::2] and trained[1] == split[1::2]
    assert sorted(trained[0] + trained[1]) == sorted(split)
    assert not set(trained[0]) & set(trained[1])
    state = json.loads((Path(reports[0]["final"]) / STATE_NAME).read_text())
    assert state["world_size"] == WORLD and state["samples_consumed"] == 5
    assert state["samples_consumed_by_rank"] == {"0": 3, "1": 2}
    assert set(state["last_sequence_by_rank"]) == {"0", "1"}

    # Exact resume of both ranks from step 1 (each from its own position in the checkpoint).
    final = Path(reports[0]["final"])
    weights = load_file(final / WEIGHTS_NAME)
    logs = [read_step_log(trained_samples_path(spec.output_dir, run_id, r))
            for r in range(WORLD)]  # fmt: skip
    shutil.rmtree(final)
    (final.parent / LATEST_NAME).write_text("step-00000001\n")
    resumed = await asyncio.to_thread(run_two_ranks, nats_server.url, run_id, tmp_path, True)
    assert [r["resumed_from"] for r in resumed] == [1, 1]
    assert [r["step"] for r in resumed] == [2, 2] and resumed[0]["final"] == str(final)
    again = load_file(final / WEIGHTS_NAME)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert logs == [read_step_log(trained_samples_path(spec.output_dir, run_id, r))
                    for r in range(WORLD)]  # fmt: skip


async def test_specforge_train_under_torchrun_trains_two_ranks(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    """The command as a user runs it: ``torchrun --nproc-per-node 2 -m specforge_cli
    train --run-id R``; rank 0 prints the final draft, both ranks report done at the same step."""
    import subprocess
    import sys

    spec = tiny_run_spec(run_id, target, tmp_path, train=train_spec(checkpoint_every=100))
    await seed_captured_run(bus, spec, n_train=6, n_eval=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
        "--master-port", str(_free_port()), "-m", "specforge_cli", "train",
        "--run-id", run_id, "--nats", nats_server.url, "--device", "cpu", "--threads", "1",
        "--spec-timeout", "20", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    final = tmp_path / "runs" / run_id / "checkpoints" / "step-00000002"
    assert f"final draft: {final}" in stdout.decode()
    for rank in range(WORLD):
        progress = await bus.get_record(progress_key(run_id, rank), TrainerProgress)
        assert progress.done and progress.step == 2 and progress.samples_consumed == 3


async def test_fsdp_trains_like_ddp_and_resumes_exactly(
    bus: Bus, run_id: str, target: Path, tmp_path: Path, nats_server
) -> None:
    """FSDP (sharded parameters and AdamW state) on the same data as DDP: the same updates
    (``assert_same_training``) in 2 optimizer steps with accumulation 4 under no-sync; the
    checkpoint holds full, unsharded weights; a resume from step 1 ends bit-identical to the
    uninterrupted FSDP run."""
    train = train_spec(batch_size=1, accumulation_steps=4, checkpoint_every=1)
    spec = tiny_run_spec(run_id, target, tmp_path, train=train)
    await seed_captured_run(bus, spec, n_train=16, n_eval=2, min_len=16, max_len=16)
    fsdp = await asyncio.to_thread(run_two_ranks, nats_server.url, run_id, tmp_path, False,
                                   "fsdp")  # fmt: skip
    assert [r["step"] for r in fsdp] == [2, 2] and [r["samples"] for r in fsdp] == [8, 8]
    final = Path(fsdp[0]["final"])
    state = json.loads((final / STATE_NAME).read_text())
    assert state["parallel"] == "fsdp" and state["world_size"] == WORLD
    fsdp_weights = load_file(final / WEIGHTS_NAME)

    ddp_id = f"{run_id}-ddp"
    await bus.ensure_streams(ddp_id)
    await bus.put_run_spec(tiny_run_spec(ddp_id, target, tmp_path, train=train, data_run=run_id))
    ddp = await asyncio.to_thread(run_two_ranks, nats_server.url, ddp_id, tmp_path)
    ddp_weights = load_file(Path(ddp[0]["final"]) / WEIGHTS_NAME)
    assert fsdp_weights.keys() == ddp_weights.keys()
    for key, value in fsdp_weights.items():
        assert value.shape == ddp_weights[key].shape, key  # full tensors, not shards
    assert fsdp[0]["loss"] == pytest.approx(ddp[0]["loss"], rel=1e-6)
    initial = load_file(final.parent / "step-00000000" / WEIGHTS_NAME)
    assert_same_training(initial, (fsdp_weights, ddp_weights),
                         (UpdateRecorder.load(Path(fsdp[0]["grads"])),
                          UpdateRecorder.load(Path(ddp[0]["grads"]))))  # fmt: skip
    assert not torch.equal(initial["fc.weight"], fsdp_weights["fc.weight"])

    shutil.rmtree(final)
    (final.parent / LATEST_NAME).write_text("step-00000001\n")
    resumed = await asyncio.to_thread(run_two_ranks, nats_server.url, run_id, tmp_path, True,
                                      "fsdp")  # fmt: skip
    assert [r["resumed_from"] for r in resumed] == [1, 1] and resumed[0]["final"] == str(final)
    again = load_file(final / WEIGHTS_NAME)
    assert all(torch.equal(fsdp_weights[k], again[k]) for k in fsdp_weights)
