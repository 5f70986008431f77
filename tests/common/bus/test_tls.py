"""TLS for real: a CA and certificates made here (trustme), nats-server running the shipped role
config plus a ``tls`` block, and the bus connecting through the command-line flags
(``--nats-tls-ca``, ``--nats-tls-cert``, ``--nats-tls-key``). A client that does not trust the
CA, or (mutual TLS) has no certificate, is refused."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
import trustme

from specforge_common.bus import (
    BusConfig,
    BusError,
    add_bus_arguments,
    bus_config_from_args,
    open_bus,
)
from specforge_common.nats_server import NatsServer
from tests.common.bus.roles import PASSWORDS, role_server


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path  # a CA that signed nothing of ours


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("specforge-capture")
    files = Pki(*(root / name for name in ("ca.pem", "server.pem", "server.key", "client.pem",
                                           "client.key", "stranger.pem")))  # fmt: skip
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    stranger.cert_pem.write_to_path(str(files.stranger_ca))
    return files


def tls_block(pki: Pki, *, verify: bool) -> str:
    return (
        f'tls {{\n  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca}"\n  verify: {str(verify).lower()}\n  timeout: 2\n}}\n'
    )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NatsServer]:
    with role_server(tmp_path_factory.mktemp("tls"), tls_block(pki, verify=False)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NatsServer]:
    with role_server(tmp_path_factory.mktemp("mtls"), tls_block(pki, verify=True)) as server:
        yield server


def from_flags(url: str, role: str, *tls_flags: str) -> BusConfig:
    """The BusConfig a service builds from its command line."""
    parser = argparse.ArgumentParser()
    add_bus_arguments(parser)
    args = parser.parse_args(["--nats", url, "--nats-user", f"specforge-{role}",
                              "--nats-password", PASSWORDS[role], *tls_flags])  # fmt: skip
    config = bus_config_from_args(args, f"test-{role}")
    return msgspec.structs.replace(config, connect_attempts=1, connect_timeout_s=3.0,
                                   storage="memory")  # fmt: skip


async def works(config: BusConfig, run_id: str) -> None:
    """Connect, create the run's streams (operator) or read them, and close."""
    async with await open_bus(config) as bus:
        if config.user == "specforge-operator":
            await bus.ensure_streams(run_id)
        assert (await bus.stream_state(run_id, "prompts")).messages == 0


async def test_the_bus_connects_over_tls_with_the_ca(
    tls_server: NatsServer, pki: Pki, run_id: str
) -> None:
    await works(from_flags(tls_server.url, "operator", "--nats-tls-ca", str(pki.ca)), run_id)
    await works(from_flags(tls_server.url, "capture", "--nats-tls-ca", str(pki.ca)), run_id)


@pytest.mark.parametrize("flags", [(), ("--nats-tls-ca", "STRANGER")], ids=["no-ca", "wrong-ca"])
async def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_server: NatsServer, pki: Pki, flags: tuple[str, ...]
) -> None:
    flags = tuple(str(pki.stranger_ca) if f == "STRANGER" else f for f in flags)
    with pytest.raises(BusError, match="cannot connect"):
        await open_bus(from_flags(tls_server.url, "capture", *flags))
    with pytest.raises((nats.errors.Error, OSError)):  # a bare client, no TLS settings
        await nats.connect(tls_server.url, user="specforge-capture",
                           password=PASSWORDS["capture"], allow_reconnect=False,
                           connect_timeout=2)  # fmt: skip


async def test_mutual_tls_needs_a_client_certificate(
    mtls_server: NatsServer, pki: Pki, run_id: str
) -> None:
    ca = ("--nats-tls-ca", str(pki.ca))
    cert = ("--nats-tls-cert", str(pki.client_cert), "--nats-tls-key", str(pki.client_key))
    await works(from_flags(mtls_server.url, "operator", *ca, *cert), run_id)
    with pytest.raises(BusError, match="cannot connect"):
        await open_bus(from_flags(mtls_server.url, "operator", *ca))
