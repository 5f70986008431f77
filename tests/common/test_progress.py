"""The live progress bar: drawn in place on a terminal, absent (not one control character) in a
pipe or a file, out of the way of log lines, and rate-limited."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from specforge_common.log import configure_logging, get_logger
from specforge_common.progress import (
    CLEAR_LINE,
    PROGRESS_ENV,
    Figure,
    ProgressBar,
    Rate,
    progress_wanted,
    render,
)

FIGURES = [
    Figure("prompts", 12, total=48),
    Figure("trained", 40),
    Figure("step", 5, total=20, lead=True),
    Figure("accept-len", 1.8349, digits=2),
    Figure("dead-lettered", None),
]


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No override from the environment the tests run in; a terminal that is not dumb."""
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    yield
    configure_logging("console")


@pytest.fixture
def terminal() -> Iterator[tuple[int, TextIO]]:
    """A real pseudo-terminal: (master fd to read what was drawn, the slave as a text file)."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # no "\n" -> "\r\n" translation: every "\r" read back was written
    stream = os.fdopen(slave, "w", buffering=1)
    try:
        yield master, stream
    finally:
        stream.close()
        os.close(master)


def read_available(master: int, until: str = "", timeout: float = 5.0) -> str:
    """What the terminal got so far; waits (up to ``timeout``) for ``until`` to show up."""
    data, deadline = "", time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            data += os.read(master, 65536).decode()
        if (until and until in data) or time.monotonic() > deadline:
            return data


def test_render_shows_the_numbers_the_rate_and_the_eta() -> None:
    line = render("train", FIGURES, rate=0.5, width=200)
    assert line.startswith("train | [#####---------------]  25% | prompts 12/48")
    assert "trained 40" in line and "step 5/20" in line and "accept-len 1.83" in line
    assert "dead-lettered" not in line  # None: not shown
    assert "0.50 step/s" in line and "ETA 0:30" in line  # 15 steps left at 0.5/s
    assert "\r" not in line and "\x1b" not in line
    narrow = render("train", FIGURES, rate=0.5, width=110)  # the other figures make room,
    assert len(narrow) <= 109 and "step 5/20" in narrow and narrow.endswith("ETA 0:30")
    assert "accept-len" not in narrow and "prompts 12/48 | trained 40" in narrow  # the last first
    assert len(render("train", FIGURES, rate=0.5, width=40)) == 39  # never wraps
    stalled = render("train", FIGURES, rate=0.0, width=200)
    assert "ETA --" in stalled
    # without a lead that has a total there is no bar, no rate and no ETA
    assert render("evaluate", [Figure("evaluated", 3)], rate=None, width=80) == (
        "evaluate | evaluated 3"
    )


def test_rate_follows_the_last_window_and_restarts_when_a_counter_goes_back() -> None:
    rate = Rate(window_s=10.0)
    assert rate.add(0.0, 0) is None  # under a second of history
    assert rate.add(2.0, 4) == pytest.approx(2.0)
    assert rate.add(4.0, 6) == pytest.approx(1.5)
    assert rate.add(20.0, 6) == pytest.approx(0.0, abs=1e-9)  # old points left the window
    assert rate.add(21.0, 1) is None  # a new epoch's count: history starts again


def test_the_bar_is_drawn_in_place_on_a_terminal(terminal: tuple[int, TextIO]) -> None:
    master, stream = terminal
    assert progress_wanted(stream)
    with ProgressBar("train", lambda: FIGURES, stream=stream, interval_s=0.02) as bar:
        assert bar.active
        drawn = read_available(master, until="step 5/20")
    drawn += read_available(master, timeout=0.2)
    assert CLEAR_LINE + "train | [#####" in drawn
    assert "prompts 12/48" in drawn and "trained 40" in drawn and "accept-len 1.83" in drawn
    assert drawn.endswith(CLEAR_LINE)  # erased at the end
    assert "\n" not in drawn  # redrawn in place, never scrolled


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_no_bar_and_no_control_characters_in_a_pipe_or_a_file(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "pipe":
        read_fd, write_fd = os.pipe()
        stream = os.fdopen(write_fd, "w")
    else:
        stream = (tmp_path / "log.txt").open("w")
    with ProgressBar("train", lambda: FIGURES, stream=stream, interval_s=0.01) as bar:
        assert not bar.active
        bar.refresh(force=True)
        stream.write("a log line\n")
    stream.close()
    if kind == "pipe":
        with os.fdopen(read_fd) as pipe:
            text = pipe.read()
    else:
        text = (tmp_path / "log.txt").read_text()
    assert text == "a log line\n"
    assert bar.draws == 0


def test_overrides_and_dumb_terminals(
    terminal: tuple[int, TextIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stream = terminal
    monkeypatch.setenv("TERM", "dumb")
    assert not progress_wanted(stream)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not progress_wanted(stream)
    monkeypatch.setenv(PROGRESS_ENV, "1")  # forced on, even into a pipe
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd), os.fdopen(write_fd, "w") as w:
        assert progress_wanted(w)
    monkeypatch.setenv(PROGRESS_ENV, "auto")
    assert progress_wanted(stream)


def test_log_lines_go_above_the_bar(
    terminal: tuple[int, TextIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every log line starts on an erased line and ends whole; the bar comes back under it."""
    master, stream = terminal
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json")
    log = get_logger(service="trainer")
    with ProgressBar("train", lambda: FIGURES, interval_s=0.01, min_redraw_s=0.0):
        read_available(master, until="step 5/20")
        for i in range(20):
            log.info("train", step=i, loss=1.0 / (i + 1))
        drawn = read_available(master, until='"step": 19')
    drawn += read_available(master, timeout=0.2)
    lines = drawn.split("\n")
    # each line: maybe the bar (drawn, then erased), then one whole log record, nothing after
    records = [json.loads(line.rsplit(CLEAR_LINE, 1)[-1]) for line in lines[:-1]]
    assert [r["step"] for r in records] == list(range(20))
    redrawn = [line for line in lines[1:-1] if "train | [" in line]
    assert len(redrawn) == 19  # back under every line (no redraw limit here)
    assert all(line.startswith(CLEAR_LINE) for line in redrawn)
    assert "train | [" in lines[-1] and lines[-1].endswith(CLEAR_LINE)  # erased at the end


def test_redraws_are_rate_limited(terminal: tuple[int, TextIO]) -> None:
    _, stream = terminal
    asked: list[int] = []

    def snapshot() -> list[Figure]:  # a new number every time: every refresh has news
        asked.append(1)
        return [Figure("step", len(asked), total=10**9)]

    bar = ProgressBar("train", snapshot, stream=stream, interval_s=60.0, min_redraw_s=0.1)
    with bar:
        deadline = time.monotonic() + 0.35
        while time.monotonic() < deadline:
            bar.refresh()
    assert 1 <= bar.draws <= 5  # 0.35 s at most 10 a second, however often it is asked
    unlimited = ProgressBar("train", snapshot, stream=stream, interval_s=60.0, min_redraw_s=0.0)
    with unlimited:
        for _ in range(20):
            unlimited.refresh()
    assert unlimited.draws == 20  # the limit is what held the first one back


def test_a_failing_snapshot_never_breaks_the_work(terminal: tuple[int, TextIO]) -> None:
    master, stream = terminal
    calls: list[int] = []

    def snapshot() -> list[Figure]:
        calls.append(len(calls))
        if len(calls) % 2:
            raise RuntimeError("not built yet")
        return [Figure("step", len(calls), total=1000)]

    with ProgressBar("train", snapshot, stream=stream, interval_s=0.005) as bar:
        deadline = time.monotonic() + 5.0
        while len(calls) < 10 and time.monotonic() < deadline:
            read_available(master, timeout=0.01)
        assert len(calls) >= 10 and bar.active  # the ticker lives through the failures
    assert bar.draws >= 1
