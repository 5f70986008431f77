"""Offline metrics: equal to one direct strategy call, batch-size invariant, and they move with
training. Samples come from a real seeded capture (tiny target, real bus and file store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from specforge_common.batch import TrainBatch, collate
from specforge_common.eagle3 import Eagle3Strategy
from specforge_common.targets import load_lm_head, make_tiny_target
from specforge_evaluator.offline import evaluate_draft
from tests.evaluator import build_draft, eval_samples, overfit, vocab_map_of_run
from tests.support import seed_captured_run, tiny_run_spec

K = 3


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)


@pytest.fixture
async def seeded(bus, run_id: str, target_dir: Path, tmp_path: Path):
    spec = tiny_run_spec(run_id, target_dir, tmp_path)
    refs = await seed_captured_run(bus, spec, n_train=6, n_eval=7, min_len=8, max_len=24)
    samples = eval_samples(spec, refs["eval"])
    draft = build_draft(spec, await vocab_map_of_run(bus, spec))
    head = load_lm_head(target_dir).float()
    return spec, samples, draft, head


def padded_batch(samples: list[dict[str, torch.Tensor]]) -> TrainBatch:
    """All samples in one right-padded batch, built independently of ``collate``."""

    def pad(key: str) -> torch.Tensor:
        return pad_sequence([s[key] for s in samples], batch_first=True)

    lengths = torch.tensor([s["input_ids"].shape[0] for s in samples])
    attention = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    return TrainBatch(pad("input_ids"), attention, pad("loss_mask"), pad("aux_hidden_states"),
                      pad("hidden_states"))  # fmt: skip


def test_collate_pads_right_with_zeros(seeded) -> None:
    _, samples, _, _ = seeded
    batch = collate(samples[:3])
    lengths = [s["input_ids"].shape[0] for s in samples[:3]]
    assert batch.input_ids.shape == (3, max(lengths))
    for b, n in enumerate(lengths):
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert torch.equal(batch.aux_hidden_states[b, :n], samples[b]["aux_hidden_states"])
        assert not batch.loss_mask[b, n:].any() and not batch.hidden_states[b, n:].any()


async def test_equals_one_direct_strategy_call_and_is_batch_size_invariant(seeded) -> None:
    spec, samples, draft, head = seeded
    assert len({s["input_ids"].shape[0] for s in samples}) > 1, "need ragged lengths"
    overfit(draft, samples, spec, steps=30)  # some hits, so the counts are not all zero
    with torch.no_grad():
        direct = Eagle3Strategy(draft, head, ttt_length=K)(padded_batch(samples)).metrics
    assert direct.correct.sum() >= 3 and direct.denom.min() > 0

    for batch_size in (1, 3, len(samples)):
        got = evaluate_draft(draft, head, samples, ttt_length=K, batch_size=batch_size)
        assert torch.equal(got.correct, direct.correct), batch_size
        assert torch.equal(got.denom, direct.denom), batch_size
        assert torch.equal(got.accept_denom, direct.accept_denom), batch_size
        torch.testing.assert_close(got.accept, direct.accept, rtol=1e-6, atol=1e-6)
        assert got.accuracies() == direct.accuracies()
        assert got.simulated_acceptance_length() == pytest.approx(
            direct.simulated_acceptance_length(), abs=1e-6
        )
        for k in range(K):
            assert got.summary()[f"acceptance_rate_{k}"] == pytest.approx(
                direct.summary()[f"acceptance_rate_{k}"], abs=1e-6
            )
    # The ploss sums do not depend on the batching either (only their B*T normaliser does).
    one = evaluate_draft(draft, head, samples, ttt_length=K, batch_size=1)
    torch.testing.assert_close(one.ploss, direct.ploss, rtol=1e-6, atol=1e-6)


async def test_training_on_the_eval_samples_raises_step0_accuracy(seeded) -> None:
    spec, samples, draft, head = seeded
    before = evaluate_draft(draft, head, samples, ttt_length=K, batch_size=4)
    assert draft.training  # evaluate_draft restores the mode it found
    overfit(draft, samples, spec, steps=30)
    after = evaluate_draft(draft, head, samples, ttt_length=K, batch_size=4)
    # The draft vocab (128 of 512 ids) holds the target's argmax at ~20% of these positions,
    # which caps the accuracy; an untrained draft scores ~0.
    assert after.correct[0] >= before.correct[0] + 3
    assert after.accuracies()[0] > before.accuracies()[0]
    assert after.simulated_acceptance_length() > before.simulated_acceptance_length()


def test_no_samples_gives_empty_counts(seeded) -> None:
    _, _, draft, head = seeded
    metrics = evaluate_draft(draft, head, [], ttt_length=K, batch_size=2)
    assert metrics.denom.tolist() == [0.0] * K and float(metrics.positions) == 0
