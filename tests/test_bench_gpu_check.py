"""``bench/gpu``: the GPU check's CPU smoke mode end to end (``check.sh --cpu-smoke``), and the
pieces that decide its verdict on a GPU, which the smoke run cannot show failing: the must/goal
levels, the report's merge of finished, stopped and missing parts, the first-difference judge of
the decode part, the resume check of the distributed part, the ``cuda`` marker and its older
name ``gpu``, and the pins of the wheels the device gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import distributed, report
from bench.gpu.decode import first_difference_gap
from bench.gpu.part import Context, PartResult

ROOT = Path(__file__).parent.parent


def _context(tmp_path: Path, part: str = "p") -> Context:
    result = PartResult(part, "cpu-smoke", "cpu")
    return Context(smoke=True, device=torch.device("cpu"), lowp=torch.float32, deadline=1e18,
                   result=result, out=tmp_path / f"{part}.json")  # fmt: skip


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_the_json(tmp_path: Path) -> None:
    results, out = tmp_path / "gpu.json", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_RESULTS": str(results),
           "OUT": str(out)}  # fmt: skip
    env.pop("GPU_CHECK_WHEELS", None)
    done = subprocess.run(["bash", "bench/gpu/check.sh", "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads(results.read_text())
    assert result["mode"] == "cpu-smoke" and result["ok"] and not result["failed_musts"]
    assert list(result["parts"]) == list(report.PARTS)
    for name, part in result["parts"].items():
        assert part["status"] == "ok" and part["exit_code"] == 0, (name, part.get("error"))
        assert part["checks"], name
    assert all(c["passed"] for c in result["checks"] if c["level"] == "must" and c["enforced"])
    metrics = {name: part["metrics"] for name, part in result["parts"].items()}
    cases = metrics["train_step"]["cases"]
    assert set(cases) == {"trainer@128", "trainer@64"}
    assert all(case["tok_s"] > 0 and case["forward_ms"] > 0 for case in cases.values())
    errors = metrics["capture"]["feature_relative_error"]
    assert set(errors) == {"aux_layer_1", "aux_layer_3", "aux_layer_4", "final_hidden"}
    assert metrics["decode"]["permutation_target"]["results"]["k=3"]["perfect"]["lossless"]
    assert set(metrics["decode"]["smollm2_shaped"]["by_precision"]) == {"bfloat16", "float32"}
    assert metrics["distributed"]["ddp"]["bit_identical"] and metrics["distributed"]["fsdp"][
        "bit_identical"]  # fmt: skip
    counts = metrics["cuda_tests"]["counts"]
    assert counts["tests"] >= 2 and counts["skipped"] == counts["tests"]
    assert json.loads((out / "gpu.json").read_text()) == result  # what the device tool returns
    assert "PASSED" in (out / "check.log").read_text()


def _part(name: str, status: str, checks: list[dict]) -> dict:
    return {"part": name, "mode": "device", "device": "cuda:0", "status": status, "seconds": 1.0,
            "metrics": {}, "checks": checks, "notes": [], "error": None}  # fmt: skip


def _check(name: str, level: str, passed: bool, enforced: bool = True) -> dict:
    return {"name": name, "value": 1.0 if passed else 0.0, "op": "==", "threshold": 1.0,
            "level": level, "kind": "correctness", "unit": "", "enforced": enforced, "note": "",
            "passed": passed}  # fmt: skip


def test_report_fails_on_enforced_musts_and_stopped_or_missing_parts(tmp_path, capsys) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    written = {
        "train_step": _part("train_step", "ok", [_check("tok/s", "must", False),
                                                 _check("peak", "goal", False)]),
        "capture": _part("capture", "ok", [_check("overhead", "must", False, enforced=False)]),
        "decode": _part("decode", "running", [_check("lossless", "must", True)]),
        "cuda_tests": _part("cuda_tests", "ok", [_check("passed", "must", True)]),
    }  # fmt: skip
    for name, part in written.items():
        (parts / f"{name}.json").write_text(json.dumps(part))
    out = tmp_path / "gpu.json"
    code = report.main(["--parts", str(parts), "--mode", "device", "--out", str(out),
                        "--exit-code", "decode=124", "--exit-code", "cuda_tests=1"])  # fmt: skip
    assert code == 1
    result = json.loads(out.read_text())
    assert result["failed_musts"] == ["train_step: tok/s"]  # not the goal, not the unenforced
    statuses = {name: part["status"] for name, part in result["parts"].items()}
    assert statuses == {"train_step": "ok", "capture": "ok", "decode": "timeout",
                        "distributed": "missing", "cuda_tests": "failed"}  # fmt: skip
    assert result["broken_parts"] == ["decode", "distributed", "cuda_tests"]
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "missed" in printed and "(not enforced)" in printed

    for name in report.PARTS:  # every part finished and only the goal missed: a pass
        checks = [_check("peak", "goal", False)] if name == "train_step" else []
        (parts / f"{name}.json").write_text(json.dumps(_part(name, "ok", checks)))
    assert report.main(["--parts", str(parts), "--mode", "device", "--out", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_smoke_mode_records_but_does_not_enforce_performance(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    slow = ctx.must("tok/s", 0.5, ">=", 1.0, kind="performance")
    wrong = ctx.must("lossless", 0.0, "==", 1)
    unmeasured = ctx.goal("peak", None, "<=", 1.0)
    assert not slow.passed and not slow.enforced and not slow.fails_run
    assert not wrong.passed and wrong.fails_run
    assert not unmeasured.passed and not unmeasured.fails_run  # a goal never fails the run
    ctx.metric("nan", float("nan"))
    ctx.save()  # strict JSON: NaN is written as null
    assert json.loads(ctx.out.read_text())["metrics"]["nan"] is None


def test_first_difference_gap_weighs_the_two_tokens_in_the_reference(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double().eval()
    prompt, expected = [5, 9, 13], [7]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    best, second = torch.topk(logits, 2).indices.tolist()
    expected = [best]
    gap = first_difference_gap(model, prompt, expected, second, 0)
    assert gap["gap"] == pytest.approx(float(logits[best] - logits[second]))
    assert gap["gap"] == pytest.approx(gap["top2_gap"]) and gap["gap"] > 0
    assert gap["fp64_argmax_is_expected"] == 1.0
    assert first_difference_gap(model, prompt, [second], best, 0)["gap"] < 0


def test_distributed_resume_check_passes_and_catches_a_resume_that_loads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _context(tmp_path, "distributed")
    distributed.run(ctx)
    assert [c.passed for c in ctx.result.checks] == [True, True]
    assert ctx.result.metrics["ddp"]["bit_identical"] and ctx.result.metrics["fsdp"][
        "bit_identical"]  # fmt: skip

    monkeypatch.setattr(distributed.Run, "restore", lambda self, step_dir, manager: None)
    broken = _context(tmp_path, "broken")
    distributed.run(broken)
    assert [c.passed for c in broken.result.checks] == [False, False]
    assert broken.result.metrics["ddp"]["restored_weights_max_diff"] > 0


CUDA_ALIAS_TESTS = """
import pytest

@pytest.mark.cuda
def test_new_name():
    pass

@pytest.mark.gpu
def test_old_name():
    pass

def test_plain():
    pass
"""


@pytest.mark.parametrize("marker", ["cuda", "gpu"])
def test_cuda_marker_selects_both_names_and_skips_them_without_cuda(tmp_path, marker) -> None:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_marked.py").write_text(CUDA_ALIAS_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: x\n    gpu: x\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", marker, "-rs", "-p", "no:cacheprovider",
         "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1]
    if torch.cuda.is_available():
        assert "2 passed, 1 deselected" in summary, done.stdout
    else:
        assert "2 skipped, 1 deselected" in summary, done.stdout
        assert "needs a CUDA device" in done.stdout


def test_staged_wheels_are_the_project_pins() -> None:
    """The device runs the versions this project pins, for what the image lacks."""
    pins = [line.strip() for line in (ROOT / "bench/gpu/wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert pins and all("==" in pin for pin in pins)
    assert all(f'"{pin}",' in pyproject for pin in pins), pins
