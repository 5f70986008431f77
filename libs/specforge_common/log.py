"""structlog, configured once: JSON lines for services, a readable console for the CLI.

Services bind ``service`` and ``run`` once at start and ``sample_id`` per unit of work, so any
log line can be joined with the bus records it talks about.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

import structlog

from .progress import flush_above, write_above

Style = Literal["json", "console"]

_configured: Style | None = None


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured (a
    test harness or a daemonizing wrapper may swap it; a stale handle would be closed). The one
    writer of log lines, so a live progress bar (``progress``) steps aside for each of them."""

    def write(self, text: str) -> int:
        return write_above(sys.stderr, text)

    def flush(self) -> None:
        flush_above(sys.stderr)


def configure_logging(style: Style | None = None, level: str | None = None) -> None:
    """Configure structlog and stdlib logging. Later calls with a different style reconfigure.

    ``SPECFORGE_LOG_FORMAT`` and ``SPECFORGE_LOG_LEVEL`` override the arguments, so a deployment
    can switch a CLI to JSON without code changes.
    """
    global _configured
    style = os.environ.get("SPECFORGE_LOG_FORMAT", style or "console")  # type: ignore[assignment]
    if style not in ("json", "console"):
        raise ValueError(f"SPECFORGE_LOG_FORMAT must be 'json' or 'console', not {style!r}")
    level_name = (os.environ.get("SPECFORGE_LOG_LEVEL") or level or "INFO").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level_name!r}")

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if style == "json":
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    stdlib_stream: Any = _CurrentStderr()  # stdlib warnings: the same writer
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stdlib_stream, force=True)
    _configured = style


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    """A logger with ``bound`` fields (``service``, ``run``, ``sample_id`` ...) attached."""
    if _configured is None:
        configure_logging()
    return structlog.get_logger().bind(**bound)


def bind_context(**fields: object) -> None:
    """Attach fields to every log line of the current task/thread (e.g. ``run``, ``service``)."""
    structlog.contextvars.bind_contextvars(**fields)
