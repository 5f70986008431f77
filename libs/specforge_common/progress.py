"""A live one-line progress display on a terminal; nothing at all anywhere else.

A :class:`ProgressBar` asks its ``snapshot`` for the :class:`Figure` s to show (the counters a
service already keeps: prompts captured, samples trained, optimizer steps, the latest acceptance
length) a few times a second from a thread of its own, and redraws the last line of the terminal
in place (``\\r`` ... erase to the end of the line), with the rate and ETA of its lead figure.
Redraws are rate-limited (at most ``1 / min_redraw_s`` a second).

It draws only when the stream is a terminal: into a log file, a pipe or ``docker compose`` the
output stays plain log lines without a single control character. ``SPECFORGE_PROGRESS=0`` turns
it off, ``=1`` on even when the stream is not a terminal; otherwise ``TERM=dumb`` turns it off.

Log lines and the bar share the terminal: the log writer (``specforge_common.log``) writes through
:func:`write_above` / :func:`flush_above`, which erase the bar before a line and redraw it after,
so neither garbles the other. Progress must never break the work: a snapshot that raises keeps
the previous figures, and a stream that cannot be written turns the bar off.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

PROGRESS_ENV = "SPECFORGE_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

CLEAR_LINE = "\r\x1b[K"  # back to column 0, erase to the end of the line
DEFAULT_WIDTH = 100
BAR_CELLS = 20


@dataclass(frozen=True)
class Figure:
    """One number on the bar: ``label value`` or ``label value/total``; ``None`` is not shown."""

    label: str
    value: float | None
    total: float | None = None
    digits: int = 0  # decimals of the value
    lead: bool = False  # rate and ETA are this figure's (default: the first with a total)

    def text(self) -> str:
        value = f"{self.value:.{self.digits}f}"
        return f"{self.label} {value}/{self.total:.0f}" if self.total else f"{self.label} {value}"


Snapshot = Callable[[], Sequence[Figure]]


def progress_wanted(stream: TextIO) -> bool:
    """Whether a bar may draw on ``stream``: ``SPECFORGE_PROGRESS`` if set, else a terminal that
    is not ``TERM=dumb``."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in _OFF:
        return False
    if setting in _ON:
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # closed, or not a real file
        return False


def lead_of(figures: Sequence[Figure]) -> Figure | None:
    """The figure whose rate and ETA are shown."""
    shown = [f for f in figures if f.value is not None]
    for figure in shown:
        if figure.lead:
            return figure
    return next((f for f in shown if f.total), None)


def render(title: str, figures: Sequence[Figure], rate: float | None, width: int) -> str:
    """The bar's text (no control characters), at most ``width - 1`` characters long (a full
    last column would wrap on some terminals and ``\\r`` would no longer reach the bar). Where
    it does not fit, the figures other than the lead go first, from the last; rate and ETA stay.
    """
    lead = lead_of(figures)
    head = [title]
    if lead is not None and lead.total and lead.value is not None:
        done = min(1.0, max(0.0, lead.value / lead.total))
        filled = round(done * BAR_CELLS)
        head.append(f"[{'#' * filled}{'-' * (BAR_CELLS - filled)}] {done:4.0%}")
    shown = [f for f in figures if f.value is not None]
    tail = []
    if lead is not None and rate is not None:
        tail.append(f"{rate:.2f} {lead.label}/s")
        if lead.total and lead.value is not None and lead.value < lead.total:
            eta = (lead.total - lead.value) / rate if rate > 0 else None
            tail.append(f"ETA {_duration(eta)}")
    limit = max(0, width - 1)
    line = " | ".join([*head, *(f.text() for f in shown), *tail])
    while len(line) > limit and any(f is not lead for f in shown):
        shown.remove(next(f for f in reversed(shown) if f is not lead))
        line = " | ".join([*head, *(f.text() for f in shown), *tail])
    return line[:limit]


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds > 99 * 3600:
        return "--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Rate:
    """Per-second rate of a counter over the last ``window_s`` seconds (a counter that goes
    back, e.g. a new epoch's count, starts the window afresh)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> float | None:
        if self._points and value < self._points[-1][1]:
            self._points.clear()
        self._points.append((now, value))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window_s:
            self._points.popleft()
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / (t1 - t0) if t1 - t0 >= 1.0 else None


_active: ProgressBar | None = None  # the bar on the terminal, which log lines go above


class ProgressBar:
    """``with ProgressBar("train", snapshot):`` shows the snapshot's figures while the block
    runs (only where :func:`progress_wanted`), and erases itself at the end."""

    def __init__(
        self,
        title: str,
        snapshot: Snapshot,
        *,
        stream: TextIO | None = None,
        interval_s: float = 0.25,
        min_redraw_s: float = 0.1,
        window_s: float = 30.0,
    ) -> None:
        self.title = title
        self.snapshot = snapshot
        self._stream = stream  # None: whatever sys.stderr is at each draw, like the log writer
        self.interval_s = interval_s
        self.min_redraw_s = min_redraw_s
        self._rate = Rate(window_s)
        self._rate_label: str | None = None
        self._last_rate: float | None = None
        self._figures: Sequence[Figure] = ()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._visible = False  # the bar is on the terminal's last line
        self._mid_line = False  # a log line was begun and not ended: do not draw over it
        self._drawn_at = 0.0
        self._line = ""  # the text on the terminal while visible
        self.draws = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def active(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> ProgressBar:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> bool:
        """Start drawing, if the stream wants a bar and no other bar is on it; whether it did."""
        global _active
        if self._thread is not None or _active is not None or not progress_wanted(self.stream):
            return False
        _active = self
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, name=f"progress-{self.title}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return True

    def close(self) -> None:
        """Stop drawing and erase the bar (the last log lines and any summary stay)."""
        global _active
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=5.0)
        with self._lock:
            if self._visible:
                self._write(CLEAR_LINE)
                self._visible = False
            if _active is self:
                _active = None

    def refresh(self, *, force: bool = False) -> None:
        """Redraw now, unless the last draw was under ``min_redraw_s`` ago or a log line is
        half written."""
        with self._lock:
            now = time.monotonic()
            if self._thread is None or self._mid_line:
                return
            if not force and now - self._drawn_at < self.min_redraw_s:
                return
            line = render(self.title, self._read(now), self._last_rate, self._width())
            if self._visible and line == self._line:
                return  # nothing new to show
            if self._write(CLEAR_LINE + line):
                self._visible, self._drawn_at, self._line = True, now, line
                self.draws += 1

    def _read(self, now: float) -> Sequence[Figure]:
        """The snapshot's figures (the previous ones if it fails) and the lead's rate."""
        try:
            self._figures = tuple(self.snapshot())
        except Exception:  # a half-built service: show what was there
            pass
        lead = lead_of(self._figures)
        if lead is None or lead.value is None:
            self._last_rate = None
            return self._figures
        if lead.label != self._rate_label:
            self._rate, self._rate_label = Rate(self._rate.window_s), lead.label
        self._last_rate = self._rate.add(now, float(lead.value))
        return self._figures

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or DEFAULT_WIDTH
        except (AttributeError, ValueError, OSError):
            return DEFAULT_WIDTH

    def _write(self, text: str) -> bool:
        """Write to the stream; a stream that fails turns the bar off (never the work)."""
        try:
            self.stream.write(text)
            self.stream.flush()
            return True
        except (OSError, ValueError):
            self._stop.set()
            return False

    # --- the log writer's side ---------------------------------------------------------------

    def write_above(self, stream: TextIO, text: str) -> int:
        with self._lock:
            if self._visible and text:
                self._write(CLEAR_LINE)
                self._visible = False
            if text:
                self._mid_line = not text.endswith("\n")
            return stream.write(text)

    def after_flush(self) -> None:
        if not self._mid_line:
            self.refresh()


def write_above(stream: TextIO, text: str) -> int:
    """Write a log line's text to ``stream``, first erasing the bar if one is drawn."""
    bar = _active
    if bar is None:
        return stream.write(text)
    return bar.write_above(stream, text)


def flush_above(stream: TextIO) -> None:
    """Flush ``stream`` and, once the log line is complete, redraw the bar below it."""
    stream.flush()
    bar = _active
    if bar is not None:
        bar.after_flush()
