"""Test-only fault injection, so the fault-matrix tests can kill a service at an exact point.

``SPECFORGE_FAULT=<point>[@<first>[-<last>]][:<action>]`` arms one named point: its hits number
``first`` to ``last`` (default 1 to ``first``) fire. Actions: ``kill`` (the default) SIGKILLs the
process itself, as ``kill -9`` would, at that point; ``enospc`` raises ``OSError(ENOSPC)`` there
(a full disk). Unset (every production run) the variable is read once at import and
``point`` returns at its first test. The points are listed in docs/operations.md ("Faults").
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "SPECFORGE_FAULT"


def _parse(spec: str | None) -> tuple[str, int, int, str] | None:
    if not spec:
        return None
    spec, _, action = spec.partition(":")
    name, _, hits = spec.partition("@")
    first, _, last = (hits or "1").partition("-")
    if action not in ("", "kill", "enospc"):
        raise ValueError(f"{ENV}: unknown action {action!r} (kill or enospc)")
    return name, int(first), int(last or first), action or "kill"


_PLAN = _parse(os.environ.get(ENV))
_hits = 0


def point(name: str) -> None:
    """A named fault point: does nothing unless ``SPECFORGE_FAULT`` arms this one."""
    if _PLAN is None or _PLAN[0] != name:
        return
    global _hits
    _hits += 1
    _, first, last, action = _PLAN
    if not first <= _hits <= last:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    os.kill(os.getpid(), signal.SIGKILL)
