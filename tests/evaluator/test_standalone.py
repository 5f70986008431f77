"""``specforge evaluate --draft --target --prompts``: real speculative decoding without a bus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specforge_cli.main import main as cli_main
from specforge_common.eagle3 import VocabMap, save_draft
from specforge_common.targets import make_tiny_target
from tests.evaluator import build_draft
from tests.support import tiny_run_spec


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target"), arch="llama", seed=0)


@pytest.fixture(scope="module")
def draft_dir(target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (untrained) draft in the SGLang layout, identity vocab map."""
    work = tmp_path_factory.mktemp("draft")
    spec = tiny_run_spec("standalone", target, work, draft_vocab_size=512)
    draft = build_draft(spec, VocabMap.identity(512))
    save_draft(draft, work / "draft")
    return work / "draft"


def write_prompts(path: Path) -> Path:
    with path.open("w") as out:
        for i in range(4):
            out.write(json.dumps({"id": f"c{i}", "conversations": [
                {"role": "user", "content": f"count with me: {i} {i + 1} {i + 2}"},
                {"role": "assistant", "content": "ok"},
            ]}) + "\n")  # fmt: skip
        out.write(json.dumps({"id": "no-prompt", "conversations": [
            {"role": "assistant", "content": "nothing before me"}]}) + "\n")  # fmt: skip
    return path


def test_standalone_evaluation_decodes_losslessly_and_reports(
    target: Path, draft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "numbers.json"
    rc = cli_main(["evaluate", "--draft", str(draft_dir), "--target", str(target),
                   "--prompts", str(prompts), "--k", "3", "--max-new-tokens", "8",
                   "--device", "cpu", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    numbers = json.loads(out.read_text())
    assert numbers["prompts"] == 4  # the record with no prompt before the assistant is skipped
    assert numbers["lossless"] is True and numbers["error"] is None
    # a random draft: about one token per verification (the target's own), never below one
    assert 1.0 <= numbers["serving_acceptance_length"] < 1.5
    assert len(numbers["serving_acceptance_rates"]) == 3
    m = numbers["metrics"]
    assert m["serving/tokens"] == 4 * 8 and m["k"] == 3
    assert m["speedup"] == pytest.approx(m["tokens_per_s_spec"] / m["tokens_per_s_target"])
    assert "serving acceptance length" in printed and "bonus token included" in printed
    # The four terms of the speedup bound, on the reported numbers, and the measured share of it.
    al, k = numbers["serving_acceptance_length"], m["k"]
    terms = [m["plain_step_ms"], m["verify_ms_per_step"], m["draft_ms_per_token"]]
    assert all(t > 0 for t in terms)
    assert m["verify_ms_per_step"] == m["target_ms_per_step"]
    assert m["ideal_speedup"] == pytest.approx(
        al * m["plain_step_ms"] / (m["verify_ms_per_step"] + k * m["draft_ms_per_token"])
    )
    assert m["speedup_vs_ideal"] == pytest.approx(m["speedup"] / m["ideal_speedup"])
    assert 0 < m["speedup_vs_ideal"] < 1.5
    assert m["serving/drafted"] > 0
    assert f"ideal {m['ideal_speedup']:.2f}x = AL {al:.2f} x plain" in printed
    assert f"measured {m['speedup']:.2f}x = {m['speedup_vs_ideal']:.2f} of ideal" in printed


def test_standalone_evaluation_refuses_incomplete_or_bad_input(
    target: Path, draft_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["evaluate", "--draft", str(draft_dir), "--target", str(target)]) == 2
    assert "--prompts" in capsys.readouterr().out
    missing = tmp_path / "nope.jsonl"
    rc = cli_main(["evaluate", "--draft", str(draft_dir), "--target", str(target),
                   "--prompts", str(missing), "--device", "cpu"])  # fmt: skip
    assert rc == 2 and "does not exist" in capsys.readouterr().out
    assert cli_main(["evaluate", "--device", "cpu"]) == 2  # neither --run nor --draft
