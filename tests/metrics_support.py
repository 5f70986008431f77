"""Scraping a live ``/metrics`` endpoint over HTTP, as Prometheus does, for the metrics tests."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted label items) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """Every sample the endpoint exposes now, parsed from the exposition text."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def ascrape(url: str) -> Samples:
    """``scrape`` off the event loop (the service under test shares it)."""
    return await asyncio.to_thread(scrape, url)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels``; KeyError naming what exists otherwise."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        near = sorted(k for k in samples if k[0] == name)
        raise KeyError(f"no sample {key}; {name} has {near}")
    return samples[key]


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``label`` value -> sample value of every ``name`` sample carrying ``label``."""
    return {
        dict(k[1])[label]: v for k, v in samples.items() if k[0] == name and label in dict(k[1])
    }


async def scrape_until(
    url: str, ready: Callable[[Samples], bool], timeout: float = 60.0, every: float = 0.2
) -> Samples:
    """Scrape until ``ready`` holds (a deadline, never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await ascrape(url)
        if ready(samples):
            return samples
        assert loop.time() < deadline, "metrics never reached the expected state"
        await asyncio.sleep(every)
