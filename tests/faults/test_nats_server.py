"""nats-server killed (SIGKILL) during capture and during training, restarted on the same port
and store dir: the services reconnect and the run ends as if nothing happened."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from specforge_common.bus import BusConfig, open_bus
from specforge_common.contracts import TrainerProgress
from specforge_common.nats_server import NatsServer
from specforge_common.subjects import progress_key
from specforge_common.targets import HFTargetEngine, make_tiny_target
from tests.capture.test_worker import (
    assert_queue_drained,
    check_samples,
    make_spec,
    samples_log,
    start_run,
    stored_files,
    token_tasks,
)
from tests.faults import finish, free_port, spawn
from tests.faults.test_trainer_evaluator import STEPS, final_weights, seed_pair, train_args, trained

pytestmark = pytest.mark.faults
N = 300  # prompts: capture outlives the kill by seconds


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("faults-nats"), arch="llama", seed=0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private nats-server on a fixed port, so a restart comes back at the same URL."""
    with NatsServer(port=free_port(), store_dir=tmp_path / "jetstream") as s:
        yield s


async def until(check, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def restart_when(server: NatsServer, check) -> None:
    """Once ``check(bus)`` holds, SIGKILL the server and start it again on the same port/dir."""
    async with await open_bus(BusConfig(servers=(server.url,), name="faults-probe")) as bus:
        await until(lambda: check(bus), timeout=300)  # slow starts on a loaded host
    server.kill()
    server.start()


async def test_nats_killed_during_capture(server: NatsServer, run_id: str, target: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    config = BusConfig(servers=(server.url,), name="faults-test")
    spec = make_spec(run_id, target, tmp_path, batch_size=2)
    tasks = token_tasks(spec, N, seed=40)
    async with await open_bus(config) as bus:
        await start_run(bus, spec, tasks, summary=True)
    proc = await spawn("capture", "--run", run_id, "--nats", server.url, "--exit-when-done")

    async def some_captured(bus) -> bool:
        return await bus.stream_depth(run_id, "samples") >= 20

    await restart_when(server, some_captured)
    code, _, err = await finish(proc, timeout=300)
    assert code == 0, err[-3000:]
    assert "nats reconnected" in err  # the server did go away mid-capture
    async with await open_bus(config) as bus:
        refs, ends = await samples_log(bus, run_id)
        check_samples(spec, HFTargetEngine.from_pretrained(target), tasks, refs)
        assert sorted(e.split for e in ends) == ["eval", "train"]
        await assert_queue_drained(bus, run_id)
    assert len(stored_files(spec)) == N


async def test_nats_killed_during_training(server: NatsServer, run_id: str, target: Path,
                                           tmp_path: Path) -> None:  # fmt: skip
    config = BusConfig(servers=(server.url,), name="faults-test")
    async with await open_bus(config) as bus:
        prompt_of = await seed_pair(bus, run_id, target, tmp_path)
    proc = await spawn("train", *train_args(f"{run_id}-ref", server.url))
    code, _, err = await finish(proc)
    assert code == 0, err[-3000:]
    proc = await spawn("train", *train_args(run_id, server.url))

    async def mid_run(bus) -> bool:
        progress = await bus.get_record(progress_key(run_id, 0), TrainerProgress)
        return progress is not None and progress.step >= 4

    await restart_when(server, mid_run)
    code, out, err = await finish(proc, timeout=300)
    if code == 0:
        assert "nats reconnected" in err  # the server did go away mid-training
    if code != 0:  # the trainer may give up on the bus; a restart resumes from its checkpoint
        proc = await spawn("train", *train_args(run_id, server.url))
        code, out, err = await finish(proc, timeout=300)
    assert code == 0, err[-3000:]
    ref, got = final_weights(tmp_path, f"{run_id}-ref"), final_weights(tmp_path, run_id)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    log = trained(tmp_path, run_id, prompt_of)
    assert [s for s, _, _ in log] == list(range(1, STEPS + 1))
    assert log == trained(tmp_path, f"{run_id}-ref", prompt_of)
