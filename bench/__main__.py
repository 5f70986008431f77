"""Run the benchmark suites: ``python -m bench [suite ...]``.

``python -m bench quality [options]`` runs the on-demand quality suite instead: it trains a
recipe from scratch (about an hour on 2 CPU cores), so a plain ``python -m bench`` leaves it
out; it takes its own options (``python -m bench quality --help``). So does ``python -m bench
soak`` (20,000 prompts through 4 capture processes and a trainer: throughput, RSS over time,
lag, lost / doubled; ``--prompts`` scales it down).
"""

from __future__ import annotations

import importlib
import sys

SUITES = [
    "featurestore",
    "mooncake",
    "bus",
    "train_step",
    "algorithms",
    "capture",
    "pipeline",
    "checkpoints",
    "distributed",
    "speculative",
]
# Run only when named, each with its own command line (``main(argv) -> exit code``).
ON_DEMAND = ["quality", "soak"]


def main(argv: list[str]) -> int:
    if argv and argv[0] in ON_DEMAND:
        return importlib.import_module(f"bench.{argv[0]}").main(argv[1:])
    wanted = argv or SUITES
    unknown = sorted(set(wanted) - set(SUITES))
    if unknown:
        print(f"unknown suite(s) {unknown}; known: {SUITES}, and on its own with options: "
              f"{ON_DEMAND}", file=sys.stderr)  # fmt: skip
        return 2
    for name in wanted:
        report = importlib.import_module(f"bench.{name}").run()
        report.print()
        print(f"  -> {report.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
