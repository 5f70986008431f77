"""Run the benchmark suites: ``python -m bench [suite ...]``."""

from __future__ import annotations

import importlib
import sys

SUITES = [
    "featurestore",
    "mooncake",
    "bus",
    "train_step",
    "capture",
    "pipeline",
    "checkpoints",
    "distributed",
    "speculative",
]


def main(argv: list[str]) -> int:
    wanted = argv or SUITES
    unknown = sorted(set(wanted) - set(SUITES))
    if unknown:
        print(f"unknown suite(s) {unknown}; known: {SUITES}", file=sys.stderr)
        return 2
    for name in wanted:
        report = importlib.import_module(f"bench.{name}").run()
        report.print()
        print(f"  -> {report.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
