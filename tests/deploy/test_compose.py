"""The compose stack, run for real (``make compose-test``; in ``make test`` when an engine answers).

Builds the image (``deploy/build-image.sh``), brings ``deploy/compose.yaml`` up on the tiny target
and waits for the final checkpoint and its evaluation; then, on a fresh stack, kills one capture
replica and the trainer container mid-run (``docker kill``: SIGKILL, no drain), starts the trainer
again as an operator would, and checks the run still completes with nothing lost or duplicated.

The stack is driven with the compose CLI users run (``docker compose``, else ``docker-compose``
1.29). testcontainers' ``DockerCompose`` would fit, but it only speaks ``docker compose`` (v2),
which the OS packages here do not ship, and its reaper needs an image registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from specforge_common.bus import BusConfig, BusError, open_bus
from specforge_common.contracts import CheckpointEvent, EndOfSplit, EnqueueSummary, EvalResult
from specforge_common.subjects import enqueue_key
from tests.test_end_to_end import write_dataset

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "specforge:dev"
OPERATOR_PASSWORD = "operator-compose-test"


def _compose_command() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _engine_problem() -> str | None:
    """Why the stack cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no container engine: the docker CLI is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no container engine: `docker info` did not answer in 30 s"
    if info.returncode != 0:
        return "no container engine answers `docker info`: " + info.stderr.strip()[-200:]
    if _compose_command() is None:
        return "no compose CLI (`docker compose` or `docker-compose`)"
    return None


pytestmark = pytest.mark.skipif((problem := _engine_problem()) is not None, reason=problem or "")


@pytest.fixture(scope="module")
def image() -> str:
    """The project image, built (or brought up to date: docker caches the layers) once."""
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), IMAGE],
                           capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    print(f"image {IMAGE} ready in {time.monotonic() - started:.0f} s")
    return IMAGE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_run(directory: Path, prompts: int, *, epochs: int, capture: str) -> list[str]:
    """A run config and ``prompts`` conversations the tiny target's draft can learn from."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.toml").write_text(f"""
max_length = 64
eval_fraction = 0.25
store_uri = "file:///runs/features"
output_dir = "/runs"
[target]
path = "/models/models/tiny"
[draft]
draft_vocab_size = 128
[train]
ttt_length = 3
learning_rate = 3e-3
warmup_ratio = 0.0
batch_size = 2
epochs = {epochs}
checkpoint_every = 8
log_every = 2
[capture]
{capture}
[eval]
max_samples = 8
serving_prompts = 4
max_new_tokens = 16
""")
    ids = write_dataset(directory / "prompts.jsonl", prompts)
    directory.chmod(0o755)  # the image's unprivileged user reads the mount
    return ids


class Stack:
    """One compose project (its own network and volumes), driven through the compose CLI."""

    def __init__(self, workdir: Path, run: str, *, profiles: tuple[str, ...] = (),
                 store_uri: str = "") -> None:  # fmt: skip
        self.run = run
        self.project = f"sfct{uuid.uuid4().hex[:8]}"
        self.nats_port = _free_port()
        self.env = (
            os.environ
            | {
                "RUN": run,
                "TARGET": "tiny",
                "NATS_PORT": str(self.nats_port),
                "SPECFORGE_IMAGE": IMAGE,
                "SPECFORGE_NATS_OPERATOR_PASSWORD": OPERATOR_PASSWORD,
                "COMPOSE_TEST_DIR": str(workdir),
            }
            | ({"STORE_URI": store_uri} if store_uri else {})
        )
        self.base = [*(_compose_command() or []), "-p", self.project,
                     "-f", str(ROOT / "deploy" / "compose.yaml"),
                     "-f", str(ROOT / "tests" / "deploy" / "compose.test.yaml"),
                     *(arg for name in profiles for arg in ("--profile", name))]  # fmt: skip

    def compose(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([*self.base, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"compose {args}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done.stdout

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    def state(self, container: str) -> dict:
        out = subprocess.run(["docker", "inspect", "-f", "{{json .State}}", container],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(out.stdout)

    def exit_code(self, service: str) -> int | None:
        """The exit code of the service's (single) container, None while it runs."""
        (container,) = self.containers(service)
        state = self.state(container)
        return None if state["Running"] or state["Restarting"] else state["ExitCode"]

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60")

    def bus_config(self) -> BusConfig:
        return BusConfig(servers=(f"nats://127.0.0.1:{self.nats_port}",),
                         user="specforge-operator", password=OPERATOR_PASSWORD)  # fmt: skip

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print(self.logs())
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5")


def _wait(what: str, condition: Callable[[], object], stack: Stack, timeout: float) -> object:
    """Poll ``condition`` until it is truthy; fail with the stack's logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1.0)  # polling interval, not synchronization: the condition decides
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{stack.logs()}")


def _finished(stack: Stack) -> bool:
    """Trainer and evaluator exited (the evaluator after the final checkpoint), both with 0."""
    codes = {service: stack.exit_code(service) for service in ("trainer", "evaluator")}
    if None in codes.values():
        return False
    assert codes == {"trainer": 0, "evaluator": 0}, stack.logs()
    return True


async def _checkpoints(stack: Stack) -> list[CheckpointEvent]:
    async with await open_bus(stack.bus_config()) as bus:
        return [r async for _, r in bus.records(stack.run, "checkpoints", CheckpointEvent)]


async def _samples_seen(stack: Stack) -> int:
    async with await open_bus(stack.bus_config()) as bus:
        try:
            return await bus.stream_depth(stack.run, "samples")
        except BusError:  # enqueue has not created the run's streams yet
            return 0


async def _check_complete(
    stack: Stack, prompt_ids: list[str], epochs: int, store_scheme: str = "file://"
) -> None:
    """Every prompt one SampleRef, nothing dead-lettered, a final checkpoint that trained every
    train sample ``epochs`` times, and an evaluation of every checkpoint."""
    async with await open_bus(stack.bus_config()) as bus:
        summary = await bus.get_record(enqueue_key(stack.run), EnqueueSummary)
        assert summary is not None and summary.skipped == 0
        assert summary.train + summary.eval == len(prompt_ids)
        refs = {"train": [], "eval": []}
        for split in refs:
            async for _, record in bus.replay(stack.run, split):
                if not isinstance(record, EndOfSplit):
                    refs[split].append(record)
        got = sorted(r.prompt_id for r in refs["train"] + refs["eval"])
        assert got == sorted(prompt_ids), "lost or duplicated prompts"
        assert len(refs["train"]) == summary.train
        spec = await bus.get_run_spec(stack.run)
        assert spec is not None and spec.store_uri.startswith(store_scheme)
        assert await bus.stream_depth(stack.run, "prompts") == 0
        assert await bus.stream_depth(stack.run, "dlq") == 0

        checkpoints = [r async for _, r in bus.records(stack.run, "checkpoints", CheckpointEvent)]
        finals = [c for c in checkpoints if c.final]
        assert len(finals) == 1 and finals[0] is checkpoints[-1]
        assert finals[0].samples_consumed == summary.train * epochs
        evals = {r.step: r async for _, r in bus.records(stack.run, "evals", EvalResult)}
        assert set(evals) == {c.step for c in checkpoints}
        final_eval = evals[finals[0].step]
        assert final_eval.lossless is True and final_eval.serving_acceptance_length >= 1.0


def test_compose_stack_trains_and_evaluates_a_run(image: str, tmp_path: Path) -> None:
    prompt_ids = _write_run(tmp_path, 32, epochs=2, capture="batch_size = 4")
    with Stack(tmp_path, run="compose-pass1") as stack:
        started = time.monotonic()
        stack.compose("up", "--detach", "--scale", "capture=2", timeout=900)
        assert len(stack.containers("capture")) == 2
        _wait("the final checkpoint's evaluation", lambda: _finished(stack), stack, 900)
        asyncio.run(_check_complete(stack, prompt_ids, epochs=2))
        took = time.monotonic() - started
        print(f"pass 1: stack up to its evaluated final checkpoint in {took:.0f} s")


def test_compose_stack_survives_killed_capture_and_trainer(image: str, tmp_path: Path) -> None:
    # Decode-mode capture one prompt at a time: slow enough that both kills land mid-run.
    decode = 'mode = "decode"\nmax_new_tokens = 40\nbatch_size = 1'
    prompt_ids = _write_run(tmp_path, 240, epochs=2, capture=decode)
    with Stack(tmp_path, run="compose-pass2") as stack:
        started = time.monotonic()
        stack.compose("up", "--detach", "--scale", "capture=2", timeout=900)
        victim, survivor = stack.containers("capture")

        _wait("20 captured samples", lambda: asyncio.run(_samples_seen(stack)) >= 20, stack, 600)
        subprocess.run(["docker", "kill", victim], check=True, capture_output=True)

        async def prompts_left() -> int:
            async with await open_bus(stack.bus_config()) as bus:
                return await bus.stream_depth(stack.run, "prompts")

        assert asyncio.run(prompts_left()) > 0, "capture finished before the kill"
        killed_capture_at = time.monotonic() - started

        def a_checkpoint_after_step_0() -> bool:
            return any(c.step > 0 for c in asyncio.run(_checkpoints(stack)))

        _wait("a checkpoint after step 0", a_checkpoint_after_step_0, stack, 600)
        (trainer,) = stack.containers("trainer")
        subprocess.run(["docker", "kill", trainer], check=True, capture_output=True)
        assert not any(c.final for c in asyncio.run(_checkpoints(stack))), "killed too late"
        killed_trainer_at = time.monotonic() - started
        stack.compose("start", "trainer")

        _wait("the final checkpoint's evaluation", lambda: _finished(stack), stack, 900)
        assert stack.state(victim)["ExitCode"] == 137  # stayed dead: the survivor took over
        assert stack.state(survivor)["ExitCode"] == 0
        trainer_logs = stack.compose("logs", "--no-color", "trainer")
        assert '"resuming"' in trainer_logs, "the restarted trainer did not resume"
        asyncio.run(_check_complete(stack, prompt_ids, epochs=2))
        print(
            f"pass 2: killed capture at {killed_capture_at:.0f} s, trainer at "
            f"{killed_trainer_at:.0f} s, completed in {time.monotonic() - started:.0f} s"
        )


def test_compose_mooncake_profile_moves_samples_through_the_holder(
    image: str, tmp_path: Path
) -> None:
    prompt_ids = _write_run(tmp_path, 24, epochs=2, capture="batch_size = 4")
    with Stack(tmp_path, run="compose-mooncake", profiles=("mooncake",),
               store_uri="mooncake://mooncake-master:50051") as stack:  # fmt: skip
        started = time.monotonic()
        stack.compose("up", "--detach", "--scale", "capture=2", timeout=900)
        _wait("the final checkpoint's evaluation", lambda: _finished(stack), stack, 900)
        asyncio.run(_check_complete(stack, prompt_ids, epochs=2, store_scheme="mooncake://"))
        took = time.monotonic() - started
        print(f"mooncake profile: stack up to its evaluated final checkpoint in {took:.0f} s")
