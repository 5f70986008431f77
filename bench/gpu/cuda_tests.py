"""Every CUDA-marked test: ``pytest -m cuda`` over the test files that mark one.

Only those files are collected, so the device needs no package that other test modules import.
On a GPU every selected test must pass and none may be skipped (the conftest skips them only
where torch sees no CUDA device); in smoke mode they must be selected and all skipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.gpu.part import Context, main

ROOT = Path(__file__).resolve().parents[2]
MARKED = re.compile(r"(mark\.(cuda|gpu)\b|pytestmark\s*=.*\b(cuda|gpu)\b)")


def marked_files(tests: Path = ROOT / "tests") -> list[Path]:
    """Test modules that mark a test ``cuda`` (or its older name ``gpu``)."""
    return sorted(p for p in tests.rglob("test_*.py") if MARKED.search(p.read_text()))


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped summed over the report's test suites."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}


def run(ctx: Context) -> None:
    files = marked_files()
    ctx.metric("files", [str(p.relative_to(ROOT)) for p in files])
    with tempfile.TemporaryDirectory(prefix="gpu-check-pytest-") as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p",
                   "no:cacheprovider", f"--junitxml={report}", *map(str, files)]  # fmt: skip
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                  timeout=max(10.0, ctx.time_left()))  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            ctx.must("pytest -m cuda finished", 0.0, "==", 1, note=f"stopped after {exc.timeout} s")
            return
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
        ctx.metric("pytest_exit_code", done.returncode)
        ctx.metric("pytest_tail", done.stdout[-1500:])
        counts = junit_counts(report) if report.is_file() else None
    ctx.metric("counts", counts)
    if counts is None:
        ctx.must("pytest -m cuda ran", 0.0, "==", 1, note=f"no report; exit code {done.returncode}")
        return
    ctx.must("pytest -m cuda: tests selected", counts["tests"], ">=", 1)
    ctx.must("pytest -m cuda: failed or errored", counts["failures"] + counts["errors"], "==", 0)
    if ctx.smoke:
        ctx.must("pytest -m cuda: skipped without CUDA", counts["skipped"], "==", counts["tests"])
    else:
        ctx.must("pytest -m cuda: skipped on the GPU", counts["skipped"], "==", 0)


if __name__ == "__main__":
    sys.exit(main("cuda_tests", run))
