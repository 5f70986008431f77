from specforge_cli.watch import pays_for_itself
from specforge_common.contracts import EvalResult


def result(**metrics: float) -> EvalResult:
    return EvalResult(
        run_id="r", step=10, checkpoint_sha256="0" * 64, acceptance_rates=[0.5],
        serving_acceptance_length=1.75, metrics=metrics, run_spec_hash="h",
    )  # fmt: skip


def test_a_faster_draft_pays_for_itself() -> None:
    line = pays_for_itself(result(speedup=1.31), k=3)
    assert line is not None and "pays for itself" in line and "NOT" not in line
    assert "1.31x" in line and "1.75" in line and "k = 3" in line


def test_a_slower_draft_is_called_out() -> None:
    line = pays_for_itself(result(speedup=0.74), k=5)
    assert line is not None and "does NOT pay for itself" in line and "0.74x" in line


def test_no_verdict_without_a_measured_speedup() -> None:
    assert pays_for_itself(result(), k=3) is None
    assert pays_for_itself(result(speedup=float("nan")), k=3) is None
