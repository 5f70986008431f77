"""``specforge run --colocated`` for real, on a terminal and into pipes: a live bar with the run's
numbers on the terminal, plain log lines without a single control character everywhere else."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
import tty
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from specforge_cli.main import build_parser, progress_environment
from specforge_common.progress import CLEAR_LINE, PROGRESS_ENV, progress_wanted
from specforge_common.targets.tiny import make_tiny_target
from tests.test_end_to_end import write_config, write_dataset

PROMPTS = 8


def run_command(tmp_path: Path, target: Path, run_id: str) -> list[str]:
    data = tmp_path / "conversations.jsonl"
    write_dataset(data, PROMPTS)
    config = write_config(tmp_path / "run.toml", target)
    return [sys.executable, "-m", "specforge_cli", "run", "--colocated", "--config", str(config),
            "--run", run_id, "--source", str(data), "--limit", str(PROMPTS),
            "--workdir", str(tmp_path / "work"), "--set", "train.epochs=1",
            "--set", "eval_fraction=0.5", "--set", "eval.max_samples=2",
            "--set", "eval.serving_prompts=0"]  # fmt: skip


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV}
    return env | {"TERM": "xterm"}


def on_a_terminal(command: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run with stdout and stderr on a real pseudo-terminal: (exit code, what it showed)."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # no "\n" -> "\r\n": every "\r" read back was written by the command
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # rows, columns
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                               env=environment())  # fmt: skip
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command closed the terminal (it exited)
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return process.wait(), shown.decode(errors="replace")


def into_pipes(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment())


def test_run_shows_a_live_bar_on_a_terminal_and_plain_logs_elsewhere(tmp_path: Path) -> None:
    target = make_tiny_target(tmp_path / "target", arch="llama", seed=0)
    (tmp_path / "tty").mkdir()
    (tmp_path / "pipe").mkdir()
    terminal_run = run_command(tmp_path / "tty", target, "progress-tty")
    piped_run = run_command(tmp_path / "pipe", target, "progress-pipe")
    with ThreadPoolExecutor(2) as pool:  # both at once: the test takes one run's time
        shown_future = pool.submit(on_a_terminal, terminal_run)
        piped = into_pipes(piped_run)
        code, shown = shown_future.result()

    assert code == 0, shown[-4000:]
    bars = [s.split("\r")[0] for s in shown.split(CLEAR_LINE) if s.startswith("run progress-tty |")]
    assert bars, shown[-4000:]
    assert any(f"prompts {PROMPTS}/{PROMPTS}" in bar for bar in bars)
    assert any("step " in bar and "[" in bar and "%" in bar for bar in bars)
    assert any("accept-len " in bar for bar in bars)  # the evaluator's latest result
    tail = shown[shown.rindex("run progress-tty |") :]
    assert CLEAR_LINE in tail and "exported draft (SGLang layout)" in tail  # erased, then summary
    assert "prompts left" not in shown  # the bar replaces the status log lines

    assert piped.returncode == 0, piped.stderr[-4000:]
    for text in (piped.stdout, piped.stderr):
        assert "\r" not in text and "\x1b" not in text
    assert "run progress-pipe |" not in piped.stderr
    assert "prompts left" in piped.stderr  # a log line per change instead
    assert "exported draft (SGLang layout)" in piped.stdout


@pytest.mark.parametrize("command", ["run", "capture", "train", "replay", "evaluate"])
def test_no_progress_turns_the_bar_off_for_the_command_and_its_services(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "auto")  # restored after the test, like the one below
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TERM", "xterm")
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        try:
            assert progress_wanted(terminal)
            parser, _ = build_parser()
            argv = [command, "--no-progress", "--run", "r"]
            progress_environment(
                parser.parse_args(argv + ["--from-run", "d"] * (command == "replay"))
            )
            assert os.environ[PROGRESS_ENV] == "0" and not progress_wanted(terminal)
        finally:
            os.close(master)


def test_commands_without_a_bar_have_no_flag_for_it() -> None:
    parser, _ = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--run", "r", "--no-progress"])
