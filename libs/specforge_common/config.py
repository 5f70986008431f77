"""Run configuration: one TOML file, environment overrides, ``--set`` overrides -> a RunSpec.

Precedence (later wins): the file, ``SPECFORGE_RUN__SECTION__KEY=value`` environment variables,
``--set section.key=value`` flags. Values are TOML literals (``3e-4``, ``true``, ``[1, 2]``);
anything that does not parse as one is taken as a string. Unknown keys are refused so a typo
never silently falls back to a default. ``strategy`` is short for ``draft.strategy``; the spec
comes back resolved (``RunSpec.resolved``: the strategy's architecture and capture method
spelled out).

A config is a file or the name of one shipped in ``specforge_common/configs`` (``demo``, the
recipes). Its optional ``[launch]`` table is not part of the RunSpec: it holds what
``specforge run`` needs to start the run (``source``, ``limit``), so a recipe names its data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import tomllib

from .contracts import RunSpec

ENV_PREFIX = "SPECFORGE_RUN__"
LAUNCH_TABLE = "launch"
LAUNCH_KEYS = {"source": str, "limit": int}
ALIASES = {"strategy": "draft.strategy"}  # short override keys


class ConfigError(ValueError):
    pass


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"empty key in override {dotted!r}")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _check_keys(data: Mapping[str, Any], struct: type, where: str) -> None:
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    for key, value in data.items():
        if key in ("kind", "schema_version") and not where:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown setting {where + key!r}; known here: {known}")
        sub = _struct_type(fields[key].type)
        if sub is not None and isinstance(value, Mapping):
            _check_keys(value, sub, f"{where}{key}.")


def _struct_type(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    return None


def build_run_spec(
    data: Mapping[str, Any],
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> RunSpec:
    """Merge overrides into ``data`` and validate it as a RunSpec with errors that name the key."""
    merged: dict[str, Any] = _deep_copy(data)
    env = os.environ if env is None else env
    for name, text in sorted(env.items()):
        if name.startswith(ENV_PREFIX):
            set_path(merged, name[len(ENV_PREFIX) :].lower().replace("__", "."), parse_value(text))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key = ALIASES.get(key.strip(), key.strip())
        set_path(merged, key, parse_value(text.strip()))
    _check_keys(merged, RunSpec, "")
    merged.setdefault("kind", "RunSpec")
    try:
        return msgspec.convert(merged, RunSpec).resolved()
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = re.search(r"at `\$\.?([^`]*)`", text)
        where = f" at {match.group(1)!r}" if match and match.group(1) else ""
        raise ConfigError(f"invalid run config{where}: {text.split(' - at `')[0]}") from None


def packaged_configs() -> list[str]:
    """Names of the run configs shipped in ``specforge_common/configs`` (``demo``, recipes)."""
    folder = resources.files("specforge_common.configs")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir()
                  if p.name.endswith(".toml"))  # fmt: skip


def read_config(name_or_path: str | Path) -> dict[str, Any]:
    """A run config as a dict: a TOML file, or the name of a packaged one (``smollm2-chat``)."""
    path = Path(name_or_path)
    if path.is_file():
        where, text = str(path), path.read_text()
    elif str(name_or_path) in packaged_configs():
        where = f"packaged config {name_or_path}"
        config = resources.files("specforge_common.configs").joinpath(f"{name_or_path}.toml")
        text = config.read_text()
    else:
        raise ConfigError(
            f"run config {name_or_path} does not exist (nor is it a packaged config: "
            f"{', '.join(packaged_configs())})"
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"run config {where} is not valid TOML: {exc}") from None


def launch_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Remove and check the ``[launch]`` table of a config dict."""
    launch = data.pop(LAUNCH_TABLE, {})
    if not isinstance(launch, dict):
        raise ConfigError(f"[{LAUNCH_TABLE}] must be a table")
    for key, value in launch.items():
        kind = LAUNCH_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"unknown key {LAUNCH_TABLE}.{key}; known: {sorted(LAUNCH_KEYS)}")
        if not isinstance(value, kind):
            raise ConfigError(f"{LAUNCH_TABLE}.{key} must be a {kind.__name__}")
    return launch


def load_run_spec(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> RunSpec:
    data = {} if path is None else read_config(path)
    launch_settings(data)
    return build_run_spec(data, overrides, env)


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
