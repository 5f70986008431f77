"""The LR schedule against the formula, and the step count the trainer derives."""

from __future__ import annotations

import math

import pytest

from specforge_trainer.schedule import LRSchedule, lr_at, total_optimizer_steps, warmup_steps
from tests.trainer import train_spec

LR, TOTAL, WARMUP = 1e-3, 100, 10


def cosine(step: int) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (TOTAL - WARMUP)))


def test_warmup_is_linear_from_lr_over_w() -> None:
    for step in range(WARMUP):
        got = lr_at(step, base_lr=LR, total_steps=TOTAL, warmup=WARMUP)
        assert got == pytest.approx(LR * (step + 1) / WARMUP)
    assert lr_at(WARMUP - 1, base_lr=LR, total_steps=TOTAL, warmup=WARMUP) == pytest.approx(LR)


@pytest.mark.parametrize("step", [WARMUP, 37, (WARMUP + TOTAL) // 2, TOTAL - 1, TOTAL])
def test_cosine_peak_midpoint_and_end(step: int) -> None:
    got = lr_at(step, base_lr=LR, total_steps=TOTAL, warmup=WARMUP)
    assert got == pytest.approx(cosine(step), abs=1e-15)


def test_cosine_landmarks() -> None:
    def lr(step: int) -> float:
        return lr_at(step, base_lr=LR, total_steps=TOTAL, warmup=WARMUP)

    assert lr(WARMUP) == pytest.approx(LR)  # peak right after warmup
    assert lr(55) == pytest.approx(LR / 2)  # halfway through the decay
    assert lr(TOTAL) == pytest.approx(0.0, abs=1e-18)
    assert lr(TOTAL + 50) == pytest.approx(0.0, abs=1e-18)  # clamped past the end
    values = [lr(s) for s in range(WARMUP, TOTAL + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_warmup_starts_at_the_peak() -> None:
    assert lr_at(0, base_lr=LR, total_steps=10, warmup=0) == pytest.approx(LR)
    assert lr_at(5, base_lr=LR, total_steps=10, warmup=0) == pytest.approx(LR / 2)


def test_constant_is_warmup_then_flat() -> None:
    sched = LRSchedule(LR, TOTAL, WARMUP, "constant")
    assert sched(0) == pytest.approx(LR / WARMUP)
    assert [sched(s) for s in (WARMUP, 50, TOTAL - 1, TOTAL + 5)] == [LR] * 4


def test_from_train_spec_uses_warmup_ratio_and_scheduler() -> None:
    sched = LRSchedule.from_train_spec(train_spec(learning_rate=2e-4, warmup_ratio=0.1), 55)
    assert (sched.base_lr, sched.total_steps, sched.warmup, sched.scheduler) == (
        2e-4, 55, 5, "cosine")  # fmt: skip
    assert warmup_steps(55, 0.1) == int(0.1 * 55)
    with pytest.raises(ValueError, match="scheduler"):
        lr_at(50, base_lr=LR, total_steps=TOTAL, warmup=0, scheduler="linear")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("samples", "batch", "epochs", "accumulation", "expected"),
    [(8, 2, 6, 1, 24), (9, 2, 1, 1, 5), (8, 2, 1, 3, 2), (10, 3, 2, 2, 4), (0, 2, 1, 1, 1)],
)
def test_total_steps_from_the_sample_count(samples, batch, epochs, accumulation, expected) -> None:
    spec = train_spec(batch_size=batch, epochs=epochs, accumulation_steps=accumulation)
    assert total_optimizer_steps(spec, samples) == expected


def test_explicit_total_steps_wins() -> None:
    assert total_optimizer_steps(train_spec(total_steps=7), 1000) == 7
