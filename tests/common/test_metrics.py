"""The shared metrics plumbing: flags and env, the endpoint's bind address, updates that never
raise, and the bus-lag gauges against a real nats-server."""

from __future__ import annotations

import argparse
import socket

import pytest
from prometheus_client import Gauge

from specforge_common.bus import Bus
from specforge_common.contracts import PromptTask
from specforge_common.lag_metrics import LagSource
from specforge_common.metrics import (
    DEFAULT_HOST,
    ServiceMetrics,
    add_metrics_arguments,
    never_raises,
)
from tests.metrics_support import ascrape, labelled, scrape, value


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_metrics_arguments(parser)
    return parser.parse_args(argv)


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def test_metrics_are_off_and_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECFORGE_METRICS_PORT", raising=False)
    monkeypatch.delenv("SPECFORGE_METRICS_HOST", raising=False)
    args = parse()
    assert args.metrics_port is None and args.metrics_host == DEFAULT_HOST == "127.0.0.1"
    args = parse("--metrics-port", "9101", "--metrics-host", "0.0.0.0")
    assert (args.metrics_port, args.metrics_host) == (9101, "0.0.0.0")


def test_the_env_supplies_defaults_and_flags_override_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECFORGE_METRICS_PORT", "9102")
    monkeypatch.setenv("SPECFORGE_METRICS_HOST", "0.0.0.0")
    assert (parse().metrics_port, parse().metrics_host) == (9102, "0.0.0.0")
    args = parse("--metrics-port", "0", "--metrics-host", "127.0.0.1")
    assert (args.metrics_port, args.metrics_host) == (0, "127.0.0.1")


def test_a_bad_env_port_is_a_usage_error_when_parsed_not_when_the_parser_is_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPECFORGE_METRICS_PORT", "nine")
    parser = argparse.ArgumentParser()
    add_metrics_arguments(parser)  # building the parser (as `specforge status` does) is fine
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "--metrics-port: invalid int value: 'nine'" in capsys.readouterr().err


def test_the_default_endpoint_listens_on_loopback_only() -> None:
    """127.0.0.2 is this machine too (all of 127/8 is loopback on Linux): a server bound to the
    wildcard answers there, one bound to 127.0.0.1 does not."""
    metrics = ServiceMetrics("test", "r")
    with metrics.served(0) as endpoint:
        assert endpoint is not None and endpoint.host == "127.0.0.1" and endpoint.port > 0
        assert endpoint.server.socket.getsockname()[0] == "127.0.0.1"
        assert scrape(endpoint.url)  # it answers on loopback
        assert not connects("127.0.0.2", endpoint.port)
    assert metrics.endpoint is None and not connects("127.0.0.1", endpoint.port)

    wildcard = ServiceMetrics("test", "r")
    with wildcard.served(0, "0.0.0.0") as endpoint:
        assert endpoint is not None and endpoint.host == "0.0.0.0"
        assert connects("127.0.0.2", endpoint.port)


def test_no_port_serves_nothing_and_a_taken_port_leaves_the_service_running() -> None:
    metrics = ServiceMetrics("test", "r")
    with metrics.served(None) as endpoint:
        assert endpoint is None and metrics.endpoint is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with metrics.served(port) as endpoint:  # logs an error, raises nothing
            assert endpoint is None and metrics.endpoint is None


class Broken(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("test", "r")
        self.gauge = Gauge("specforge_test_value", "a value", registry=self.registry)

    @never_raises
    def update(self, value: object) -> str:
        self.gauge.set(value)  # type: ignore[arg-type]
        return "updated"


def test_a_failing_update_is_counted_and_swallowed() -> None:
    metrics = Broken()
    assert metrics.update(2.5) == "updated"
    assert metrics.update("not a number") is None  # float("not a number") raises in set()
    assert metrics.update(object()) is None
    assert metrics.failures == 2
    assert metrics.registry.get_sample_value("specforge_test_value") == 2.5  # the last good one


def prompt(run_id: str, i: int) -> PromptTask:
    return PromptTask(run_id=run_id, prompt_id=f"p{i}", split="train", input_ids=[1, 2, 3],
                      loss_mask=[0, 1, 1], loss_mask_policy="given")  # fmt: skip


async def test_lag_gauges_read_durable_consumers_and_ordered_readers(bus: Bus, run_id: str) -> None:
    subjects = await bus.ensure_streams(run_id)
    consumer = await bus.work_consumer(run_id, "prompts", "capture", PromptTask, service="test")
    for i in range(5):
        await bus.publish(subjects.prompts, prompt(run_id, i), msg_id=f"p{i}")
    held = await consumer.fetch(2, timeout=2.0)  # delivered, not acked
    assert len(held) == 2
    position = 1
    sources = [
        LagSource(run_id, "prompts", "capture"),
        LagSource(run_id, "prompts", "nobody"),  # no such consumer: an error, no sample
        LagSource(run_id, "prompts", "reader", position=lambda: position),
    ]
    metrics = ServiceMetrics("test", run_id)
    stream = f"SF_{run_id}_PROMPTS"
    with metrics.served(0) as endpoint:
        assert endpoint is not None
        async with metrics.polling_lag(bus, sources, every_s=60.0):
            samples = await ascrape(endpoint.url)  # the first reading is taken on entry
            labels = {"run": run_id, "stream": stream}
            assert value(samples, "specforge_bus_consumer_pending", **labels,
                         consumer="capture") == 3  # fmt: skip
            assert value(samples, "specforge_bus_consumer_ack_pending", **labels,
                         consumer="capture") == 2  # fmt: skip
            assert value(samples, "specforge_bus_consumer_pending", **labels,
                         consumer="reader") == 5 - 1  # fmt: skip
            assert "nobody" not in labelled(samples, "specforge_bus_consumer_pending", "consumer")
            assert value(samples, "specforge_bus_lag_errors_total", run=run_id) == 1
            for delivery in held:
                await delivery.ack_sync()
            position = 5
        # leaving the block reads once more: the last values a scrape sees are current
        samples = await ascrape(endpoint.url)
    await consumer.close()
    assert value(samples, "specforge_bus_consumer_ack_pending", run=run_id, stream=stream,
                 consumer="capture") == 0  # fmt: skip
    assert value(samples, "specforge_bus_consumer_pending", run=run_id, stream=stream,
                 consumer="reader") == 0  # fmt: skip


async def test_lag_is_not_polled_without_an_endpoint(bus: Bus, run_id: str) -> None:
    await bus.ensure_streams(run_id)
    metrics = ServiceMetrics("test", run_id)
    async with metrics.polling_lag(bus, [LagSource(run_id, "prompts", "nobody")], every_s=0.01):
        pass
    errors = metrics.registry.get_sample_value("specforge_bus_lag_errors_total", {"run": run_id})
    assert errors == 0  # nothing was asked
