"""The algorithm table agrees with the registries: three strategies, each with its capture method
and a registered draft architecture; a config naming only the strategy is complete."""

from __future__ import annotations

import pytest

from specforge_common.algorithms import ALGORITHMS, algorithm
from specforge_common.batch import FEATURE_KEYS_BY_METHOD
from specforge_common.config import ConfigError, build_run_spec
from specforge_common.registry import DRAFT_ARCHITECTURES
from specforge_common.strategies import STRATEGIES

TARGET = {"run_id": "r", "target": {"path": "/nowhere"}}


def test_the_registries_hold_three_strategies_that_match_the_table() -> None:
    assert STRATEGIES.names() == sorted(ALGORITHMS) == ["dflash", "domino", "eagle3"]
    for name, row in ALGORITHMS.items():
        strategy = STRATEGIES.get(name)
        assert strategy.capture_method == row.capture_method
        assert row.capture_method in FEATURE_KEYS_BY_METHOD
        assert DRAFT_ARCHITECTURES.get(row.architecture) is not None
    assert STRATEGIES.get("eagle3").weighted_loss is False
    assert STRATEGIES.get("dflash").weighted_loss is STRATEGIES.get("domino").weighted_loss is True


@pytest.mark.parametrize("name", ["dflash", "domino", "eagle3"])
def test_naming_the_strategy_resolves_architecture_and_capture_method(name: str) -> None:
    spec = build_run_spec(TARGET, [f"strategy={name}"])
    assert spec.draft.strategy == name
    assert spec.draft.architecture == algorithm(name).architecture
    assert spec.capture.method == spec.capture_method == algorithm(name).capture_method
    # the resolved spec is what goes on the bus: building it again changes nothing
    assert build_run_spec({**TARGET, "draft": {"strategy": name}}).spec_hash() == spec.spec_hash()


def test_a_capture_method_that_contradicts_the_strategy_is_refused() -> None:
    with pytest.raises(ConfigError, match="trains on 'dflash' features but capture.method"):
        build_run_spec(TARGET, ["strategy=dflash", "capture.method=eagle3"])
    with pytest.raises(ConfigError, match="unknown training strategy 'medusa'"):
        build_run_spec(TARGET, ["strategy=medusa"])
