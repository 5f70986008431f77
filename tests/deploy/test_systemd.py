"""The bare-metal deployment files: every systemd unit passes ``systemd-analyze verify``, runs a
command the real parsers accept, restarts and stops the way the services expect; the env file
example names only variables something reads; the 3-node NATS cluster example forms a cluster
that keeps a replicated run's streams writable when a node stops."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import pytest

from specforge_common.bus import BusError, add_bus_arguments, bus_config_from_args, open_bus
from specforge_common.contracts import PromptTask
from specforge_common.nats_server import find_nats_server
from specforge_common.subjects import RunSubjects
from tests.common.bus.roles import PASSWORDS, password_env
from tests.deploy.cluster import NODES, example_cluster
from tests.deploy.test_deploy_files import parse_cli
from tests.deploy.units import (
    SYSTEMD,
    UNITS,
    env_file_assignments,
    environment,
    exec_argv,
    read_unit,
    referenced_variables,
    value,
    values,
)

T = TypeVar("T")
ROOT = SYSTEMD.parents[1]
ENV_EXAMPLE = SYSTEMD / "specforge.env.example"
SPECFORGE = "/opt/specforge/.venv/bin/specforge"
NATS_SERVER = "/usr/local/bin/nats-server"
# The only programs the units may name; anything else fails verify (it is not in the fake root).
PROGRAMS = (SPECFORGE, NATS_SERVER, "/bin/kill")
GPU_UNITS = [u for u in UNITS if u.name.startswith("specforge-")]
# Installed path -> the repository file it is installed from (deploy/README.md's layout).
NATS_FILES = {"/etc/nats/nats-server.conf": ROOT / "deploy" / "nats-server.conf"} | {
    f"/etc/nats/nats-cluster/{n.name}": n for n in NODES
}
SERVICE_OF_COMMAND = {"capture": "capture", "train": "trainer", "evaluate": "evaluator"}


def unit_name(path: Path, instance: str = "my-run") -> str:
    return path.name.replace("@.", f"@{instance}.")


# --- systemd-analyze verify ------------------------------------------------------------------


def system_unit_dir() -> Path | None:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root for ``systemd-analyze verify --root``: this machine's system units (the targets
    the units order against), the shipped units, and an executable at each allowed program
    path, so verify checks that ExecStart names the installed paths and nothing else."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    system = system_unit_dir()
    if system is None:
        pytest.skip("no systemd system units (sysinit.target) on this machine")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for program in PROGRAMS:
        path = root / program.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root


def verify(root: Path, unit: Path, text: str | None = None) -> str:
    """Install ``unit`` (or ``text`` under its name) in ``root``; verify's complaints, or ''."""
    (root / "etc/systemd/system" / unit.name).write_text(text or unit.read_text())
    out = subprocess.run(["systemd-analyze", "verify", f"--root={root}", unit_name(unit)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    complaints = (out.stdout + out.stderr).strip()
    return complaints or ("" if out.returncode == 0 else f"exit {out.returncode}")


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_accepts_the_unit(fake_root: Path, unit: Path) -> None:
    assert verify(fake_root, unit) == ""


def test_systemd_analyze_verify_catches_a_broken_unit(fake_root: Path) -> None:
    """Verify exits 0 on unknown keys and bad values (it only warns): the check reads its
    output, and this is the proof that it would notice."""
    unit = GPU_UNITS[0]
    text = unit.read_text()
    assert "Restrt" in verify(fake_root, unit, text + "Restrt=no\n")
    assert "on-fail" in verify(fake_root, unit, text.replace("=on-failure", "=on-fail"))
    assert "not executable" in verify(fake_root, unit, text.replace(SPECFORGE, "/opt/x/specforge"))
    verify(fake_root, unit)  # put the shipped one back for the other tests


# --- what the units run ---------------------------------------------------------------------


def example_settings() -> dict[str, str]:
    """The env file example with its commented examples switched on (an install's values)."""
    return env_file_assignments(ENV_EXAMPLE, commented=True)


@pytest.mark.parametrize("settings", ["defaults", "example"])
@pytest.mark.parametrize("unit", [u for u in UNITS if u.name != "nats-server.service"],
                         ids=lambda p: p.name)  # fmt: skip
def test_specforge_units_run_commands_the_cli_accepts(unit: Path, settings: str) -> None:
    overrides = example_settings() if settings == "example" else {}
    argv = exec_argv(read_unit(unit), "my-run", overrides)
    assert argv[0] == SPECFORGE
    parse_cli(argv[1:])
    if "--run" in argv:  # a capture instance's own env file may name another run
        run = overrides.get("SPECFORGE_CAPTURE_RUN", "my-run")
        assert argv[argv.index("--run") + 1] == run


def test_a_capture_instance_env_file_picks_its_run_and_gpu() -> None:
    """One capture worker per GPU: instance my-run-gpu1 and capture@my-run-gpu1.env."""
    unit = read_unit(SYSTEMD / "specforge-capture@.service")
    env_files = values(unit, "Service", "EnvironmentFile")
    assert env_files[-1] == "-/etc/specforge/capture@%i.env"  # last: it wins
    settings = {"SPECFORGE_CAPTURE_RUN": "my-run", "CUDA_VISIBLE_DEVICES": "1"}
    argv = exec_argv(unit, "my-run-gpu1", settings)
    assert argv[argv.index("--run") + 1] == "my-run"
    assert argv[argv.index("--producer-id") + 1] == "capture-gpu-node-1-my-run-gpu1"
    assert environment(unit, "my-run-gpu1", settings)["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.fixture
def nats_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, password in password_env().items():
        monkeypatch.setenv(name, password)


@pytest.mark.parametrize("conf", sorted(NATS_FILES), ids=lambda c: c.rsplit("/", 1)[-1])
@pytest.mark.usefixtures("nats_passwords")
def test_nats_server_unit_starts_a_valid_config(conf: str) -> None:
    """The unit's command line, with each config it may be pointed at (NATS_CONF), passes the
    real server's ``-t`` check; the cluster nodes' relative include resolves in that layout."""
    unit = read_unit(SYSTEMD / "nats-server.service")
    default = environment(unit, "")["NATS_CONF"]
    assert default in NATS_FILES
    argv = exec_argv(unit, "", {"NATS_CONF": conf})
    assert argv[0] == NATS_SERVER
    argv = [str(NATS_FILES.get(a, a)) for a in argv[1:]]
    out = subprocess.run([str(find_nats_server()), *argv, "-t"], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stderr


def test_unit_variables_have_defaults_and_appear_in_the_env_example() -> None:
    """An ExecStart ``${VAR}`` without an ``Environment=`` default would pass an empty word when
    the env file lacks it; every one is documented in the example (or is the unit's own)."""
    documented = example_settings()
    for path in UNITS:
        unit = read_unit(path)
        defaults = environment(unit, "my-run")
        for name in referenced_variables(unit):
            assert name in defaults, f"{path.name}: ${{{name}}} has no Environment= default"
            assert name in documented or name == "NATS_CONF", f"{name} not in {ENV_EXAMPLE.name}"


# --- restart, stop and hardening -------------------------------------------------------------


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_restart_on_failure_within_limits(path: Path) -> None:
    unit = read_unit(path)
    assert "network-online.target" in " ".join(values(unit, "Unit", "After"))
    assert "network-online.target" in " ".join(values(unit, "Unit", "Wants"))
    assert int(value(unit, "Unit", "StartLimitIntervalSec") or 0) > 0
    assert int(value(unit, "Unit", "StartLimitBurst") or 0) > 0
    assert value(unit, "Service", "Restart") == "on-failure"
    assert int(value(unit, "Service", "RestartSec") or 0) > 0
    assert int(value(unit, "Service", "TimeoutStopSec") or 0) >= 30
    assert value(unit, "Service", "User") not in (None, "root")
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(path: Path) -> None:
    unit = read_unit(path)
    assert value(unit, "Service", "NoNewPrivileges") == "yes"
    assert value(unit, "Service", "ProtectSystem") == "strict"
    assert value(unit, "Service", "PrivateTmp") == "yes"


@pytest.mark.parametrize("path", GPU_UNITS, ids=lambda p: p.name)
def test_gpu_units_keep_devices_and_drain_on_sigterm(path: Path) -> None:
    """The GPU roles see /dev as it is, write only their state, cache and shared-store dirs,
    and get SIGTERM alone (their handler drains or checkpoints; KillMode=mixed keeps it from
    reaching their child processes first) long enough to finish."""
    unit = read_unit(path)
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow"):
        assert value(unit, "Service", key) in (None, "no"), key
    writable = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    assert {"/var/lib/specforge", "/var/cache/specforge"} <= set(writable)
    assert value(unit, "Service", "WorkingDirectory") == "/var/lib/specforge"  # ./runs lands here
    assert value(unit, "Service", "KillSignal") in (None, "SIGTERM")
    assert value(unit, "Service", "KillMode") == "mixed"
    assert int(value(unit, "Service", "TimeoutStopSec") or 0) >= 120
    service = SERVICE_OF_COMMAND[exec_argv(unit, "r")[1]]
    command = (ROOT / "services" / service / "command.py").read_text()
    assert "signal.SIGTERM" in command, "the unit relies on a SIGTERM handler"


# --- the env file example ---------------------------------------------------------------------


def variables_read_by_code() -> set[str]:
    names: set[str] = set()
    for package in ("libs", "services"):
        for source in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"[\"'](SPECFORGE_[A-Z0-9_]+)[\"']", source.read_text()))
    return names


def test_env_example_names_only_variables_something_reads() -> None:
    read = variables_read_by_code()
    for path in UNITS:
        unit = read_unit(path)
        read |= referenced_variables(unit) | set(environment(unit, "r"))
    named = {n for n in example_settings() if n.startswith("SPECFORGE_")}
    assert named - read == set(), "the example names variables nothing reads"
    nats = {n for n in variables_read_by_code() if n.startswith("SPECFORGE_NATS_")}
    assert nats - named == set(), "the example misses NATS settings the services read"
    assert {"SPECFORGE_LOG_FORMAT", "SPECFORGE_CACHE", "CUDA_VISIBLE_DEVICES"} <= set(
        example_settings()
    )


def test_env_example_is_what_the_units_read() -> None:
    plain = env_file_assignments(ENV_EXAMPLE, commented=False)
    assert plain["SPECFORGE_LOG_FORMAT"] in ("json", "console")
    assert "SPECFORGE_NATS_PASSWORD" not in plain, "role passwords belong in <role>.env"
    for path in GPU_UNITS:
        assert values(read_unit(path), "Service", "EnvironmentFile")[0] == "/etc/specforge/env"


# --- the 3-node JetStream cluster example ------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, nats_passwords: None) -> Iterator[dict[str, object]]:
    with example_cluster(tmp_path) as servers:
        yield servers


def enqueue_args(urls: list[str]) -> argparse.Namespace:
    """What `specforge enqueue` parses, given the env example's URL list and replicas."""
    parser = argparse.ArgumentParser()
    add_bus_arguments(parser)
    return parser.parse_args(
        [
            "--nats",
            ",".join(urls),
            "--nats-user",
            "specforge-enqueue",
            "--nats-password",
            PASSWORDS["enqueue"],
            "--nats-replicas",
            "3",
        ]
    )


async def until(deadline: float, attempt: Callable[[], Awaitable[T]], what: str) -> T:
    """``attempt()`` until it returns without raising; the last error after ``deadline``."""
    while True:
        try:
            return await attempt()
        except Exception as exc:  # retried, then reported
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {exc!r}") from exc
            await asyncio.sleep(0.2)


async def test_example_cluster_keeps_a_replicated_run_writable_without_a_node(
    cluster: dict, run_id: str
) -> None:
    urls = [server.url for server in cluster.values()]
    operator = await nats.connect(servers=urls, user="specforge-operator",
                                  password=PASSWORDS["operator"])  # fmt: skip
    try:
        js = operator.jetstream(timeout=2)
        deadline = time.monotonic() + 30
        await until(deadline, js.account_info, "no JetStream meta leader")
        config = bus_config_from_args(enqueue_args(urls), "test-enqueue")
        assert config.servers == tuple(urls) and config.replicas == 3
        # A publish the stopped leader never answers times out, then goes to the new leader.
        bus = await open_bus(msgspec.structs.replace(config, request_timeout_s=2.0))
        async with bus:
            subjects = await until(deadline, lambda: bus.ensure_streams(run_id), "R3 streams")
            stream = subjects.stream("prompts")
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
            task = PromptTask(run_id=run_id, prompt_id="p0", split="train", input_ids=[1, 2],
                              loss_mask=[1, 1], loss_mask_policy="given")  # fmt: skip
            await bus.publish(RunSubjects(run_id).prompts, task, msg_id="p0")

            cluster[info.cluster.leader].stop()  # the stream's leader goes away
            second = PromptTask(run_id=run_id, prompt_id="p1", split="train", input_ids=[3],
                                loss_mask=[1], loss_mask_policy="given")  # fmt: skip
            deadline = time.monotonic() + 30

            async def publish_and_count() -> int:
                await bus.publish(RunSubjects(run_id).prompts, second, msg_id="p1")
                depth = await bus.stream_depth(run_id, "prompts")
                if depth != 2:
                    raise BusError(f"depth {depth}")
                return depth

            assert await until(deadline, publish_and_count, "publish after losing a node") == 2
    finally:
        await operator.close()
