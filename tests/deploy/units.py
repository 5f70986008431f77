"""Reading the shipped systemd units the way systemd does, as far as the tests need: sections
with repeatable keys, ``Environment=`` defaults, ``%`` specifiers and ``${VAR}`` in ExecStart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
HOSTNAME = "gpu-node-1"

Unit = dict[str, list[tuple[str, str]]]  # section -> (key, value) in file order


def read_unit(path: Path) -> Unit:
    unit: Unit = {}
    section = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: keep each setting on one line"
        if line.startswith("["):
            section = line.strip("[]")
            unit.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str | None:
    found = values(unit, section, key)
    return found[-1] if found else None


def specifiers(text: str, instance: str) -> str:
    """``%i``, ``%H`` and ``%%``: the specifiers the shipped units use."""
    table = {"i": instance, "H": HOSTNAME, "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


def environment(
    unit: Unit, instance: str, overrides: dict[str, str] | None = None
) -> dict[str, str]:
    """What the unit's ``Environment=`` lines set, then ``overrides`` (an env file wins)."""
    env: dict[str, str] = {}
    for line in values(unit, "Service", "Environment"):
        for assignment in shlex.split(specifiers(line, instance)):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env | (overrides or {})


def exec_argv(unit: Unit, instance: str, overrides: dict[str, str] | None = None) -> list[str]:
    """ExecStart as the process receives it: ``${VAR}`` is one word (empty when unset)."""
    line = value(unit, "Service", "ExecStart")
    assert line, "no ExecStart"
    env = environment(unit, instance, overrides)
    line = specifiers(line, instance)
    assert not re.search(r"\$(?!\{)\w", line), "use ${VAR} (one word), not $VAR"
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env.get(m.group(1), "")), line))


def referenced_variables(unit: Unit) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", value(unit, "Service", "ExecStart") or ""))


def env_file_assignments(path: Path, *, commented: bool) -> dict[str, str]:
    """``KEY=value`` lines of an env file; with ``commented`` also ``# KEY=value`` examples."""
    prefix = r"(?:#\s*)?" if commented else ""
    pattern = re.compile(rf"^{prefix}([A-Z][A-Z0-9_]*)=(.*)$")
    found = (pattern.match(line.strip()) for line in path.read_text().splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}
