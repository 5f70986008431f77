"""Logging: JSON lines with the bound fields for services, readable lines for the CLI."""

from __future__ import annotations

import json

import pytest

from specforge_common.log import bind_context, configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_console():
    yield
    configure_logging("console")


def test_json_lines_carry_bound_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    bind_context(service="capture", run="r1")
    try:
        get_logger(sample_id="s-7").info("captured", tokens=12)
    finally:
        import structlog

        structlog.contextvars.clear_contextvars()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "captured"
    assert (line["service"], line["run"], line["sample_id"], line["tokens"]) == (
        "capture", "r1", "s-7", 12,
    )  # fmt: skip
    assert line["level"] == "info" and "timestamp" in line


def test_console_is_readable_and_levels_filter(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", level="warning")
    log = get_logger(run="r2")
    log.info("hidden")
    log.warning("shown", step=3)
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "shown" in err and "step=3" in err and not err.lstrip().startswith("{")


def test_env_overrides_and_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECFORGE_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="SPECFORGE_LOG_FORMAT"):
        configure_logging("console")
    monkeypatch.delenv("SPECFORGE_LOG_FORMAT")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("console", level="chatty")
