"""The tiny target every capture test module captures with (one per module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from specforge_common.targets import HFTargetEngine, make_tiny_target


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("capture-target") / "tiny", seed=0)


@pytest.fixture(scope="module")
def engine(target_dir: Path) -> HFTargetEngine:
    return HFTargetEngine.from_pretrained(target_dir)
