"""``python -m bench soak`` on a few hundred prompts: its code path, not its numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_soak_runs_end_to_end_and_reports_no_loss(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "soak", "--prompts", "200", "--captures", "2",
         "--every", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and (result["lost"], result["doubled"]) == (0, 0)
    assert result["trained_not_once"] == 0 and result["train_samples"] == 192
    assert set(result["rss_max_mib"]) == {"capture-0", "capture-1", "trainer"}
    assert result["timeline"] and result["capture_prompts_per_s"] > 0
