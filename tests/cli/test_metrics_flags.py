"""Every service command takes the Prometheus flags, off by default and loopback-bound."""

from __future__ import annotations

import pytest

from specforge_cli.main import build_parser

SERVICE_COMMANDS = [
    ["capture", "--run", "r"],
    ["train", "--run", "r"],
    ["replay", "--run", "r", "--from-run", "a"],
    ["evaluate", "--run", "r"],
]


@pytest.mark.parametrize("command", SERVICE_COMMANDS, ids=lambda c: c[0])
def test_service_commands_take_the_metrics_flags(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPECFORGE_METRICS_PORT", raising=False)
    monkeypatch.delenv("SPECFORGE_METRICS_HOST", raising=False)
    parser, _ = build_parser()
    args = parser.parse_args(command)
    assert args.metrics_port is None and args.metrics_host == "127.0.0.1"
    args = parser.parse_args([*command, "--metrics-port", "9103", "--metrics-host", "0.0.0.0"])
    assert (args.metrics_port, args.metrics_host) == (9103, "0.0.0.0")
