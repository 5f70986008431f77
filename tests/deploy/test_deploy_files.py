"""Static checks of deploy/: no docker engine runs here, so the files are parsed and every
command they run is checked against the real CLI parser."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

from specforge_cli.main import build_parser
from specforge_common.config import build_run_spec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def parse_cli(argv: list[str]) -> None:
    parser, _ = build_parser()
    parser.parse_args(argv)  # SystemExit(2) on an unknown command or flag


def _defaults(text: str) -> str:
    """``${VAR:-default}`` as compose expands it when VAR is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_compose_services_run_real_commands_and_bind_loopback() -> None:
    compose = yaml.safe_load(_defaults((DEPLOY / "compose.yaml").read_text()))
    services = compose["services"]
    assert {"nats", "models", "capture", "trainer", "evaluator", "enqueue"} <= set(services)
    assert {"mooncake-master", "mooncake-holder", "capture-gpu"} <= set(services)
    for name, service in services.items():
        assert service["image"] == "specforge:dev", f"{name} runs another image"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        parse_cli(service["command"])
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_compose_nats_uses_the_role_config_and_every_role_its_user() -> None:
    services = yaml.safe_load(_defaults((DEPLOY / "compose.yaml").read_text()))["services"]
    assert "/app/deploy/nats-server.conf" in services["nats"]["command"]
    conf = (DEPLOY / "nats-server.conf").read_text()
    for name, user in [
        ("enqueue", "specforge-enqueue"),
        ("capture", "specforge-capture"),
        ("trainer", "specforge-trainer"),
        ("evaluator", "specforge-evaluator"),
    ]:
        assert services[name]["environment"]["SPECFORGE_NATS_USER"] == user
        assert f"user: {user}," in conf
        password_variable = f"SPECFORGE_NATS_{name.upper()}_PASSWORD"
        assert password_variable in services["nats"]["environment"]


def test_compose_run_config_is_a_valid_run_spec() -> None:
    data = tomllib.loads((DEPLOY / "compose-run.toml").read_text())
    spec = build_run_spec(data | {"run_id": "demo"}, [], {})
    assert spec.store_uri == "file:///runs/features"


def test_dockerfile_pins_the_same_torch_and_copies_what_exists() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"torch=={pin}" in dockerfile
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["tini", "--", "specforge"]' in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, flags=re.M), "image must not run as root"
