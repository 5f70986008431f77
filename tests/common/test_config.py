"""Run config: file, environment and --set overrides; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from specforge_common.config import ConfigError, build_run_spec, load_run_spec

BASE = {"run_id": "r1", "target": {"path": "/models/t"}}


def test_file_env_and_set_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('run_id = "r1"\nseed = 3\n[target]\npath = "/m"\n[train]\nepochs = 1\n'
                    'learning_rate = 1e-4\n')  # fmt: skip
    env = {"SPECFORGE_RUN__TRAIN__EPOCHS": "2", "SPECFORGE_RUN__TRAIN__LEARNING_RATE": "5e-4",
           "UNRELATED": "x"}  # fmt: skip
    spec = load_run_spec(path, ["train.learning_rate=3e-4", "draft.aux_layer_ids=[1, 2, 3]"], env)
    assert (spec.seed, spec.train.epochs, spec.train.learning_rate) == (3, 2, 3e-4)
    assert spec.draft.aux_layer_ids == (1, 2, 3)
    assert spec.target.path == "/m"


def test_values_that_are_not_toml_literals_are_strings() -> None:
    spec = build_run_spec(BASE, ["store_uri=file:///data/features", "capture.mode=decode"], {})
    assert spec.store_uri == "file:///data/features" and spec.capture.mode == "decode"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=1", "unknown setting 'train.lr'"),
        ("train.epochs=two", "'train.epochs'"),
        ("capture.mode=sample", "'capture.mode'"),
        ("train.attention=flash", "'train.attention'"),
        ("train.precision=fp16", "'train.precision'"),
        ("train.loss_chunk_tokens=-1", "loss_chunk_tokens must be >= 0"),
        ("seed.x=1", "'seed'"),
        ("novalue", "section.key=value"),
    ],
)
def test_bad_overrides_are_refused_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_run_spec(BASE, [override], {})


def test_missing_and_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_spec(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("run_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_spec(bad, env={})
    with pytest.raises(ConfigError, match="run_id"):
        build_run_spec({"target": {"path": "/m"}}, [], {})


def test_packaged_configs_are_valid_run_specs_and_load_by_name() -> None:
    """Every config shipped with the package (the demo, the recipes) is a valid RunSpec, and its
    ``[launch]`` table (data source and volume) only holds keys ``specforge run`` knows."""
    from specforge_common.config import launch_settings, packaged_configs, read_config

    names = packaged_configs()
    assert {"demo", "smollm2-chat"} <= set(names)
    for name in names:
        data = read_config(name)
        launch = launch_settings(data)
        assert set(launch) <= {"source", "limit"}
        spec = build_run_spec({**data, "run_id": "r", "target": {"path": "/m"}}, [], {})
        assert spec.max_length > 0
        assert load_run_spec(name, ["run_id=r", "target.path=/m"], env={}) == spec
    recipe = read_config("smollm2-chat")
    assert recipe["capture"]["mode"] == "decode" and launch_settings(recipe)["limit"] > 0


def test_a_bad_launch_table_is_refused() -> None:
    from specforge_common.config import launch_settings

    with pytest.raises(ConfigError, match="unknown key launch.sorce"):
        launch_settings({"launch": {"sorce": "sharegpt"}})
    with pytest.raises(ConfigError, match="launch.limit must be a int"):
        launch_settings({"launch": {"limit": "many"}})
