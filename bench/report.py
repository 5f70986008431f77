"""What every benchmark returns, and how the harness prints and stores it."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Row:
    case: str
    value: float
    unit: str


@dataclass
class BenchReport:
    """Measurements of one suite plus the ratios against a baseline measured in the same run."""

    suite: str
    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # name -> measured / baseline
    goals: dict[str, float] = field(default_factory=dict)  # ratio name -> minimum wanted
    notes: list[str] = field(default_factory=list)

    def add(self, case: str, value: float, unit: str) -> None:
        self.rows.append(Row(case, value, unit))

    def print(self) -> None:
        print(f"\n== {self.suite} ==")
        width = max([len(r.case) for r in self.rows] + [len(k) for k in self.ratios] + [10])
        for r in self.rows:
            print(f"  {r.case:<{width}}  {r.value:>14,.2f}  {r.unit}")
        for name, ratio in self.ratios.items():
            goal = self.goals.get(name)
            verdict = "" if goal is None else ("  ok" if ratio >= goal else f"  BELOW goal {goal}")
            print(f"  {name:<{width}}  {ratio:>14.3f}x{verdict}")
        for note in self.notes:
            print(f"  note: {note}")

    def save(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.suite}.json"
        payload = asdict(self) | {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path
