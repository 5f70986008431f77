"""The shipped 3-node JetStream cluster example (``deploy/nats-cluster/``) started on loopback:
the node files copied beside the shipped ``nats-server.conf`` (their ``include`` is relative),
the nodes' addresses moved to 127.0.0.1 and free route ports, everything else unchanged."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from specforge_common.nats_server import NatsServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NODES = sorted((DEPLOY / "nats-cluster").glob("node-*.conf"))
EXAMPLE_ADDRESS = re.compile(r"\b10\.0\.0\.1(\d)\b")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_copy(workdir: Path) -> list[Path]:
    """The example configs under ``workdir``, same layout, routed over loopback. The client
    port and the store dir come from ``NatsServer``'s flags, which refuse a second store_dir."""
    routes = {str(n): free_port() for n in range(1, len(NODES) + 1)}

    def local(text: str) -> str:
        text = re.sub(r"^\s*store_dir:.*$", "", text, flags=re.M)
        text = re.sub(r"\b10\.0\.0\.1(\d):6222\b", lambda m: f"127.0.0.1:{routes[m.group(1)]}",
                      text)  # fmt: skip
        return EXAMPLE_ADDRESS.sub("127.0.0.1", text)

    (workdir / "nats-cluster").mkdir(parents=True)
    (workdir / "nats-server.conf").write_text(local((DEPLOY / "nats-server.conf").read_text()))
    copies = []
    for node in NODES:
        copy = workdir / "nats-cluster" / node.name
        copy.write_text(local(node.read_text()))
        copies.append(copy)
    return copies


@contextmanager
def example_cluster(workdir: Path) -> Iterator[dict[str, NatsServer]]:
    """The three nodes, by server_name, each with its own store; stopped on exit. The caller
    sets the role passwords the configs read in the environment."""
    with ExitStack() as stack:
        servers = {}
        for conf in loopback_copy(workdir):
            name = re.search(r"^server_name:\s*(\S+)", conf.read_text(), flags=re.M).group(1)
            server = NatsServer(store_dir=workdir / f"js-{conf.stem}",
                                extra_args=("-c", str(conf)))  # fmt: skip
            servers[name] = stack.enter_context(server)
        yield servers
