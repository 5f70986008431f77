"""The aux-layer rule: which 3 target layers feed an EAGLE-3 draft."""

from __future__ import annotations

import pytest

from specforge_common.targets import default_aux_layer_ids, resolve_aux_layer_ids


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [(8, (1, 3, 4)), (30, (1, 14, 26)), (32, (1, 15, 28)), (36, (1, 17, 32))],
)
def test_default_ids_follow_1_half_minus_1_n_minus_4(num_layers: int, expected: tuple) -> None:
    assert default_aux_layer_ids(num_layers) == expected


def test_default_refuses_targets_too_shallow_for_three_layers() -> None:
    with pytest.raises(ValueError):
        default_aux_layer_ids(4)


DRAFT = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 10, 20]}}


def test_explicit_ids_win_over_draft_config_and_default() -> None:
    assert resolve_aux_layer_ids([0, 5, 29], DRAFT, 30) == (0, 5, 29)


def test_draft_config_wins_over_default() -> None:
    assert resolve_aux_layer_ids(None, DRAFT, 30) == (2, 10, 20)


@pytest.mark.parametrize("draft", [None, {}, {"eagle_config": {}}, {"eagle_config": None}])
def test_default_when_nothing_is_configured(draft) -> None:
    assert resolve_aux_layer_ids(None, draft, 32) == (1, 15, 28)


@pytest.mark.parametrize(
    "ids",
    [[1, 2], [1, 2, 3, 4], [-1, 2, 3], [1, 2, 30], [1.0, 2, 3], ["1", 2, 3], [True, 2, 3], []],
)
def test_invalid_explicit_ids_are_refused(ids: list) -> None:
    with pytest.raises(ValueError):
        resolve_aux_layer_ids(ids, DRAFT, 30)


def test_invalid_draft_config_ids_are_refused() -> None:
    bad = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 15, 40]}}
    with pytest.raises(ValueError, match="out of range"):
        resolve_aux_layer_ids(None, bad, 32)
