"""The SPECFORGE_FAULT grammar (the kill itself is exercised by tests/faults)."""

from __future__ import annotations

import errno

import pytest

from specforge_common import faults


def test_the_fault_spec_grammar() -> None:
    assert faults._parse(None) is None and faults._parse("") is None
    assert faults._parse("capture.mid_batch") == ("capture.mid_batch", 1, 1, "kill")
    assert faults._parse("trainer.mid_step@5") == ("trainer.mid_step", 5, 5, "kill")
    assert faults._parse("store.put@2-4:enospc") == ("store.put", 2, 4, "enospc")
    with pytest.raises(ValueError, match="unknown action"):
        faults._parse("store.put:explode")


def test_an_armed_enospc_point_fires_on_its_hits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_PLAN", faults._parse("store.put@2-3:enospc"))
    monkeypatch.setattr(faults, "_hits", 0)
    faults.point("store.put")  # hit 1: passes
    faults.point("capture.mid_batch")  # another point: not counted
    for _ in range(2):
        with pytest.raises(OSError) as info:
            faults.point("store.put")
        assert info.value.errno == errno.ENOSPC
    faults.point("store.put")  # hit 4: space is back
