"""A real nats-server running the shipped ``deploy/nats-server.conf`` (one user per role), with
test passwords in the environment it reads them from."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from specforge_common.bus import BusConfig
from specforge_common.nats_server import NatsServer

CONF = Path(__file__).resolve().parents[3] / "deploy" / "nats-server.conf"
ROLES = ("operator", "enqueue", "capture", "trainer", "evaluator")
PASSWORDS = {role: f"test-{role}-pw" for role in ROLES}


def password_env() -> dict[str, str]:
    return {f"SPECFORGE_NATS_{role.upper()}_PASSWORD": pw for role, pw in PASSWORDS.items()}


@contextmanager
def role_server(workdir: Path, extra_conf: str = "") -> Iterator[NatsServer]:
    """The shipped config (``include``d unchanged, plus ``extra_conf``, e.g. a tls block) on a
    free loopback port; the command-line flags of ``NatsServer`` override listen and store."""
    # include takes relative paths only; the store dir comes from the command line (the server
    # refuses it twice).
    shipped = re.sub(r"^\s*store_dir:.*$", "", CONF.read_text(), flags=re.M)
    (workdir / "shipped.conf").write_text(shipped)
    conf = workdir / "nats-test.conf"
    conf.write_text(f'include "shipped.conf"\n{extra_conf}\n')
    saved = {name: os.environ.get(name) for name in password_env()}
    os.environ.update(password_env())
    try:
        with NatsServer(store_dir=workdir / "js", extra_args=("-c", str(conf))) as server:
            yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def role_config(url: str, role: str, **over: object) -> BusConfig:
    """How the service of ``role`` connects: its user and password, short timeouts for tests."""
    fields: dict[str, object] = dict(
        servers=(url,), name=f"test-{role}", user=f"specforge-{role}", password=PASSWORDS[role],
        connect_attempts=1, request_timeout_s=5.0, storage="memory",
    )  # fmt: skip
    return BusConfig(**(fields | over))
