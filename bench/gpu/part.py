"""What every part of the GPU check shares: its command line, its result file and its checks.

A part is ``python -m bench.gpu.<part> [--smoke] --out FILE [--budget-s S]``. It writes its
``PartResult`` after every case it finishes, so a part that ``check.sh`` stops at its time cap
still leaves what it measured. Checks carry a level: a failed ``must`` fails the whole check, a
``goal`` is reported, ``info`` is a number to read. In smoke mode (CPU, tiny dims) performance
checks are recorded but not enforced: only correctness is proved there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from specforge_common.log import configure_logging

Level = Literal["must", "goal", "info"]
Kind = Literal["correctness", "performance"]
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    ">=": lambda v, t: v >= t,
    "==": lambda v, t: v == t,
}


@dataclass
class Check:
    """One number against its threshold (``value op threshold``)."""

    name: str
    value: float | None
    op: str
    threshold: float
    level: Level
    kind: Kind
    unit: str = ""
    enforced: bool = True  # False: smoke mode's performance numbers (tiny CPU runs mean nothing)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.value is not None and OPS[self.op](float(self.value), self.threshold)

    @property
    def fails_run(self) -> bool:
        return self.level == "must" and self.enforced and not self.passed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


@dataclass
class PartResult:
    part: str
    mode: str  # "device" or "cpu-smoke"
    device: str
    status: str = "running"  # running | ok | failed
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [c.as_dict() for c in self.checks]
        return out


@dataclass
class Context:
    """What a part needs to know about where it runs."""

    smoke: bool
    device: torch.device
    lowp: torch.dtype  # the serving/training precision: bf16 on CUDA, fp32 in smoke mode
    deadline: float  # time.monotonic() after which optional cases are skipped
    result: PartResult
    out: Path
    started: float = field(default_factory=time.monotonic)

    def check(
        self,
        level: Level,
        name: str,
        value: float | None,
        op: str,
        threshold: float,
        kind: Kind,
        unit: str = "",
        note: str = "",
    ) -> Check:
        enforced = not (self.smoke and kind == "performance")
        value = None if value is None else float(value)
        made = Check(name, value, op, threshold, level, kind, unit, enforced, note)
        self.result.checks.append(made)
        return made

    def must(self, name: str, value: float | None, op: str, threshold: float, *,
             kind: Kind = "correctness", unit: str = "", note: str = "") -> Check:  # fmt: skip
        return self.check("must", name, value, op, threshold, kind, unit, note)

    def goal(self, name: str, value: float | None, op: str, threshold: float, *,
             kind: Kind = "performance", unit: str = "", note: str = "") -> Check:  # fmt: skip
        return self.check("goal", name, value, op, threshold, kind, unit, note)

    def info(self, name: str, value: float | None, op: str, threshold: float, *,
             kind: Kind = "performance", unit: str = "", note: str = "") -> Check:  # fmt: skip
        return self.check("info", name, value, op, threshold, kind, unit, note)

    def metric(self, name: str, value: Any) -> None:
        self.result.metrics[name] = value

    def note(self, text: str) -> None:
        self.result.notes.append(text)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.result.seconds = time.monotonic() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(finite(self.result.as_dict()), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, self.out)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, so the JSON is strict (no ``NaN`` tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    """Versions and the device, for the record."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(part: str, run: Callable[[Context], None], argv: list[str] | None = None) -> int:
    """Parse the part's command line, run it, save its result; 0 unless the part broke."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.gpu.{part}")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny dims, fp32")
    parser.add_argument("--out", type=Path, required=True, help="where the part's JSON goes")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=120.0,
        help="after this many seconds optional cases are skipped",
    )
    args = parser.parse_args(argv)
    configure_logging("console", "WARNING")  # the parts print their own lines; env overrides
    if not args.smoke and not torch.cuda.is_available():
        print(f"{part}: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mode = "cpu-smoke" if args.smoke else "device"
    ctx = Context(
        smoke=args.smoke,
        device=device,
        lowp=torch.float32 if args.smoke else torch.bfloat16,
        deadline=time.monotonic() + args.budget_s,
        result=PartResult(part, mode, str(device)),
        out=args.out,
    )
    ctx.save()
    try:
        run(ctx)
        ctx.result.status = "ok"
        return_code = 0
    except Exception as exc:
        ctx.result.status = "failed"
        ctx.result.error = f"{type(exc).__name__}: {exc}"
        ctx.note(traceback.format_exc()[-3000:])
        traceback.print_exc()
        return_code = 1
    ctx.save()
    return return_code
