"""How to reach NATS and how a run's streams behave, from code or from command-line flags."""

from __future__ import annotations

import argparse
import os
import ssl
from typing import Literal

import msgspec

DEFAULT_ACK_WAIT_S = 10.0


class BusConfig(msgspec.Struct, kw_only=True, frozen=True):
    """How to reach NATS and how the run's streams behave. All fields have safe defaults."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "specforge"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None
    connect_timeout_s: float = 5.0
    connect_attempts: int = 3  # per server, for the first connection
    max_reconnect_attempts: int = -1  # after a connection was made; -1: keep trying forever
    request_timeout_s: float = 10.0
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    duplicate_window_s: float = 3600.0
    # A work-queue delivery not acked (or touched with in_progress) for this long goes to
    # another consumer. Holders heartbeat every ack_wait / 3, so a live worker keeps its
    # deliveries however long a batch takes, and a killed one loses them within this wait.
    ack_wait_s: float = DEFAULT_ACK_WAIT_S
    max_deliver: int = 5
    max_ack_pending: int = 1000

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca_file or self.tls_cert_file):
            return None
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file or None
        )
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """NATS connection flags shared by every command that talks to the bus."""
    env = os.environ.get
    group = parser.add_argument_group("NATS connection (flags override SPECFORGE_NATS_* env)")
    group.add_argument(
        "--nats",
        default=env("SPECFORGE_NATS_URL", "nats://127.0.0.1:4222"),
        help="comma-separated server URLs (env SPECFORGE_NATS_URL)",
    )
    group.add_argument("--nats-user", default=env("SPECFORGE_NATS_USER"))
    group.add_argument("--nats-password", default=env("SPECFORGE_NATS_PASSWORD"))
    group.add_argument("--nats-creds", default=env("SPECFORGE_NATS_CREDS"), help="creds file")
    group.add_argument("--nats-tls-ca", default=env("SPECFORGE_NATS_TLS_CA"))
    group.add_argument("--nats-tls-cert", default=env("SPECFORGE_NATS_TLS_CERT"))
    group.add_argument("--nats-tls-key", default=env("SPECFORGE_NATS_TLS_KEY"))
    group.add_argument(
        "--nats-replicas",
        type=int,
        default=int(env("SPECFORGE_NATS_REPLICAS", "1")),
        help="copies of each stream this command creates (3 on a 3-node JetStream cluster, so "
        "a run survives losing a node; env SPECFORGE_NATS_REPLICAS, default 1)",
    )
    group.add_argument(
        "--ack-wait",
        type=float,
        default=float(env("SPECFORGE_ACK_WAIT_S", DEFAULT_ACK_WAIT_S)),
        help="seconds before an unacked work-queue delivery (a prompt, a checkpoint) goes to "
        "another worker; live workers heartbeat every third of it; applies to consumers this "
        f"command creates (env SPECFORGE_ACK_WAIT_S, default {DEFAULT_ACK_WAIT_S:g})",
    )


def bus_config_from_args(args: argparse.Namespace, name: str) -> BusConfig:
    return BusConfig(
        servers=tuple(s.strip() for s in args.nats.split(",") if s.strip()),
        name=name,
        user=args.nats_user,
        password=args.nats_password,
        creds_file=args.nats_creds,
        tls_ca_file=args.nats_tls_ca,
        tls_cert_file=args.nats_tls_cert,
        tls_key_file=args.nats_tls_key,
        replicas=args.nats_replicas,
        ack_wait_s=args.ack_wait,
    )
