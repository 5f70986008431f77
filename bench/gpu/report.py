"""Merge the parts' results into one ``gpu.json``, print the table, and say whether the check
passed: every part finished and no enforced ``must`` failed (exit 0), else exit 1.

``python -m bench.gpu.report --parts DIR --mode device --out FILE [--out FILE ...]
[--exit-code PART=CODE ...] [--select PART,PART]``: ``DIR`` holds ``<part>.json``; the exit
codes (``timeout``'s 124 among them) come from ``check.sh``; ``--select``: the parts that ran
(default all), a part left out is not missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu.part import finite, machine

PARTS = ("train_step", "capture", "decode", "distributed", "cuda_tests")


def load_part(parts: Path, name: str, exit_code: int | None) -> dict[str, Any]:
    path = parts / f"{name}.json"
    if not path.is_file():
        return {
            "part": name,
            "status": "missing",
            "checks": [],
            "metrics": {},
            "notes": [],
            "exit_code": exit_code,
            "error": "the part wrote no result",
        }
    part = json.loads(path.read_text())
    part["exit_code"] = exit_code
    if part["status"] == "running" or exit_code in (124, 137):
        part["status"] = "timeout"
        part["error"] = part.get("error") or "stopped at its time cap; numbers so far kept"
    elif exit_code not in (None, 0) and part["status"] == "ok":
        part["status"] = "failed"
        part["error"] = f"exit code {exit_code}"
    return part


def merge(parts_dir: Path, mode: str, exit_codes: dict[str, int],
          selected: tuple[str, ...] = PARTS) -> dict[str, Any]:  # fmt: skip
    parts = {name: load_part(parts_dir, name, exit_codes.get(name)) for name in selected}
    checks = [check | {"part": name} for name, part in parts.items() for check in part["checks"]]
    failed = [c for c in checks if c["level"] == "must" and c["enforced"] and not c["passed"]]
    broken = [name for name, part in parts.items() if part["status"] != "ok"]
    return {
        "mode": mode,
        "selected_parts": list(selected),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "ok": not failed and not broken,
        "failed_musts": [f"{c['part']}: {c['name']}" for c in failed],
        "broken_parts": broken,
        "parts": parts,
        "checks": checks,
    }


def _value(check: dict[str, Any]) -> str:
    value = check["value"]
    if value is None:
        return "n/a"
    return f"{value:.4g}{check['unit']}"


def table(result: dict[str, Any]) -> str:
    lines = [f"== GPU check ({result['mode']}) on {result['machine'].get('gpu', 'cpu')} =="]
    for name, part in result["parts"].items():
        lines.append(
            f"  {name:<12} {part['status']:<8} {part.get('seconds', 0):6.1f} s"
            + (f"  {part['error']}" if part.get("error") else "")
        )
    width = max([len(c["name"]) for c in result["checks"]] + [20])
    lines.append("")
    for c in result["checks"]:
        if not c["enforced"]:
            verdict = "(not enforced)"
        else:
            verdict = "ok" if c["passed"] else ("FAIL" if c["level"] == "must" else "missed")
        limit = f"{c['level']} {c['op']} {c['threshold']:g}"
        lines.append(
            f"  {c['part']:<12} {c['name']:<{width}}  {_value(c):>12}  {limit:<14} {verdict}"
        )
    lines.append("")
    lines.append(
        "PASSED"
        if result["ok"]
        else "FAILED: "
        + "; ".join(
            result["failed_musts"]
            + [f"{p}: {result['parts'][p]['status']}" for p in result["broken_parts"]]
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.report")
    parser.add_argument("--parts", type=Path, required=True)
    parser.add_argument("--mode", required=True, choices=("device", "cpu-smoke"))
    parser.add_argument("--out", type=Path, action="append", required=True)
    parser.add_argument("--exit-code", action="append", default=[], metavar="PART=CODE")
    parser.add_argument("--select", default=",".join(PARTS), help="the parts that were run")
    args = parser.parse_args(argv)
    selected = tuple(name for name in args.select.split(",") if name)
    unknown = sorted(set(selected) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    codes = {}
    for item in args.exit_code:
        name, _, code = item.partition("=")
        codes[name] = int(code)
    result = merge(args.parts, args.mode, codes, selected)
    text = json.dumps(finite(result), indent=2, allow_nan=False) + "\n"
    for out in args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(table(result))
    print("results: " + ", ".join(map(str, args.out)))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
