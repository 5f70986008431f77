"""``python -m bench quality`` on a tiny target: the whole code path (``specforge run`` of a
recipe, the log and checkpoint facts, both prompt sets decoded at k = 2, the JSON and the table)
in seconds, so the benchmark cannot rot while nobody runs its hour-long real recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import quality
from specforge_common.targets.tiny import make_tiny_target

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def write_dataset(path: Path, n: int) -> None:
    """Conversations with a learnable pattern: the assistant repeats the user's words twice."""
    with path.open("w") as out:
        for i in range(n):
            words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6))
            out.write(json.dumps({"id": f"conv-{i}", "conversations": [
                {"role": "user", "content": "repeat: " + words},
                {"role": "assistant", "content": words + " " + words},
            ]}) + "\n")  # fmt: skip


def write_recipe(path: Path, target: Path, data: Path) -> Path:
    """A recipe shaped like smollm2-chat (a [launch] table, decode-free), tiny and quick."""
    path.write_text(f"""
max_length = 128
eval_fraction = 0.25
[launch]
source = "{data}"
limit = 24
[target]
path = "{target}"
[draft]
draft_vocab_size = 128
[train]
ttt_length = 3
learning_rate = 3e-3
warmup_ratio = 0.0
batch_size = 4
epochs = 2
checkpoint_every = 100
log_every = 2
[capture]
batch_size = 8
[eval]
max_samples = 4
serving_prompts = 2
max_new_tokens = 8
""")
    return path


def check_row(row: dict, k: int, prompts: int) -> None:
    assert tuple(row) == quality.RESULT_FIELDS
    assert row["k"] == k and row["prompts"] == prompts and row["tokens"] == prompts * 8
    assert row["lossless"] is True and row["error"] is None
    assert row["serving_acceptance_length"] >= 1.0
    assert len(row["acceptance_per_position"]) == k
    assert row["speedup"] > 0 and row["tokens_per_s_spec"] > 0 and row["tokens_per_s_target"] > 0
    terms = (row["plain_step_ms"], row["verify_ms_per_step"], row["draft_ms_per_token"])
    assert all(t > 0 for t in terms)
    ideal = row["serving_acceptance_length"] * row["plain_step_ms"] / (
        row["verify_ms_per_step"] + k * row["draft_ms_per_token"])  # fmt: skip
    assert row["ideal_speedup"] == pytest.approx(ideal)
    assert row["speedup_vs_ideal"] == pytest.approx(row["speedup"] / ideal)
    assert 0 < row["speedup_vs_ideal"] < 1.5
    assert row["simulated_acceptance_length"] is not None
    # over k = 2 of the run's K = 3 positions (from accuracies logged to 4 digits)
    assert 0 <= row["simulated_acceptance_length_at_k"] <= row["simulated_acceptance_length"] + 1e-3


def test_bench_quality_trains_a_recipe_and_judges_it_on_unseen_prompts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = make_tiny_target(tmp_path / "target", arch="llama", seed=0)
    data = tmp_path / "conversations.jsonl"
    write_dataset(data, 40)  # the recipe reads 24: 3 land in its eval split, 4 more past it
    recipe = write_recipe(tmp_path / "tiny-recipe.toml", target, data)
    out = tmp_path / "quality.json"
    rc = quality.main(["--config", str(recipe), "--workdir", str(tmp_path / "work"),
                       "--prompts", "4", "--max-new-tokens", "8", "--ks", "2",
                       "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    result = json.loads(out.read_text())  # strict JSON: no NaN
    assert result["suite"] == "quality" and result["recipe"] == "tiny-recipe"
    assert set(result["machine"]) >= {"platform", "cores", "torch_threads"}

    run = result["run"]
    assert run["exit_code"] == 0 and run["wall_s"] > 0 and not run["skipped"]
    assert run["spec_matches_run"] is True and run["final"] is True
    assert run["samples_trained"] > 0 and run["tokens_trained"] > run["samples_trained"]
    phases = run["phases"]
    for name in ("capture", "train", "eval"):
        assert 0 <= phases[name]["start_s"] < phases[name]["end_s"] <= run["wall_s"]
    assert phases["eval"]["checkpoints"] >= 2 and phases["eval"]["busy_s"] > 0
    assert run["last_eval"]["final"] is True and run["last_eval"]["step"] == run["final_step"]

    sets = result["prompt_sets"]
    assert list(sets) == ["held_out", "alpaca_eval"]
    held_out = sets["held_out"]
    assert held_out["split"] == "eval" and held_out["records_read"] == 24
    # the run's own eval split first, topped up from the same split past the run's limit
    assert held_out["from_run_eval_split"] == 3 and held_out["from_past_limit"] == 1
    assert any("never read by it" in note for note in result["notes"])
    for prompt_set in sets.values():
        assert prompt_set["prompts"] == 4 and len(prompt_set["results"]) == 1
        check_row(prompt_set["results"][0], k=2, prompts=4)
    assert "held_out" in printed and "alpaca_eval" in printed and "of ideal" in printed

    # --skip-run judges the run's draft again without training: the same facts, no run time.
    again = tmp_path / "again.json"
    rc = quality.main(["--config", str(recipe), "--skip-run", run["run_dir"], "--prompts", "1",
                       "--max-new-tokens", "4", "--ks", "1", "--out", str(again)])  # fmt: skip
    assert rc == 0
    second = json.loads(again.read_text())["run"]
    assert second["skipped"] and second["wall_s"] is None and second["exit_code"] is None
    assert second["spec_matches_run"] is True and second["draft_dir"] == run["draft_dir"]
    assert second["samples_trained"] == run["samples_trained"]
    assert second["phases"]["train"]["wall_s"] == pytest.approx(phases["train"]["wall_s"])


def test_simulated_acceptance_length_over_k_positions() -> None:
    """``sum_{j<k} prod_{i<=j} acc_i`` (docs/eagle3.md: [0.8, 0.4] gives 0.8 + 0.32)."""
    assert quality.simulated_at([0.8, 0.4], 2) == pytest.approx(1.12)
    assert quality.simulated_at([0.8, 0.4], 1) == pytest.approx(0.8)
    assert quality.simulated_at([0.8, 0.4], 5) == pytest.approx(1.12)  # only K positions known
    assert quality.simulated_at(None, 3) is None
