"""The DFlash strategy against a slow reference that drafts one block per forward."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from specforge_common.batch import TrainBatch
from specforge_common.dflash.anchors import sample_anchors
from specforge_common.dflash.metrics import BlockMetrics
from specforge_common.dflash.strategy import DFlashStrategy
from specforge_common.models.dflash import DFlashConfig, DFlashDraft
from specforge_common.registry import STRATEGIES

from .reference import cross_entropy, randomize_norms, tiny_target_config

V, H, BS = 40, 16, 4


def make_setup(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object):
    gen = torch.Generator().manual_seed(seed)
    config = DFlashConfig.from_target(
        tiny_target_config(), num_hidden_layers=2, block_size=BS, initializer_range=0.2,
        mask_token_id=V - 1, **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    draft = DFlashDraft(config).to(dtype)
    randomize_norms(draft, gen)
    head = torch.randn(V, H, generator=gen, dtype=dtype)
    embedding = torch.randn(V, H, generator=gen, dtype=dtype)
    T, lengths = 13, (13, 9)
    attention = torch.zeros(2, T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
    loss_mask = attention.clone()
    loss_mask[0, :3] = 0  # a prompt
    loss_mask[0, 8] = 0  # a gap inside the answer
    loss_mask[1, :1] = 0
    batch = TrainBatch(
        input_ids=torch.randint(0, V - 1, (2, T), generator=gen) * attention,
        attention_mask=attention,
        loss_mask=loss_mask,
        aux_hidden_states=torch.randn(2, T, config.target_width, generator=gen, dtype=dtype),
        seeds=torch.tensor([3, 4]),
    )
    return draft, head, embedding, batch


def reference(draft: DFlashDraft, head: torch.Tensor, embedding: torch.Tensor,
              batch: TrainBatch, num_anchors: int, gamma: float | None, shift: bool = False,
              ) -> dict[str, float]:  # fmt: skip
    """One forward per block with its own explicit mask; CE, weights and acceptance by loops."""
    cfg = draft.config
    bs, W = cfg.block_size, cfg.sliding_window
    anchors, valid = sample_anchors(batch.loss_mask, batch.attention_mask, batch.seeds, num_anchors)
    ks = list(range(0, bs)) if shift else list(range(1, bs))
    loss = weight = correct = supervised = accepted = blocks = 0.0
    for b in range(batch.input_ids.shape[0]):
        ids, lm = batch.input_ids[b].tolist(), batch.loss_mask[b].tolist()
        length = int(batch.attention_mask[b].sum())
        for anchor, ok in zip(anchors[b].tolist(), valid[b].tolist(), strict=True):
            if not ok:
                continue
            blocks += 1
            tokens = [ids[anchor]] + [cfg.mask_token_id] * (bs - 1)
            context = draft.project_context(batch.aux_hidden_states[b : b + 1, :anchor])
            q_pos = list(range(anchor, anchor + bs))
            key_pos = list(range(anchor)) + q_pos
            allowed = [[W is None or kp > qp - W for kp in key_pos] for qp in q_pos]
            hidden = draft(embedding[tokens][None], context, torch.tensor([q_pos]),
                           torch.arange(anchor)[None], torch.tensor([allowed]))[0]  # fmt: skip
            prefix_alive = True
            for k in ks:
                index = anchor + k + 1 if shift else anchor + k
                if index >= length or not lm[index]:
                    prefix_alive = False
                    continue
                decay = 1.0
                if gamma is not None:
                    decay = math.exp(-(k if shift else k - 1) / gamma)
                logits = hidden[k] @ head.T
                loss += decay * cross_entropy(logits, ids[index]).item()
                weight += decay
                right = int(logits.argmax()) == ids[index]
                correct += right
                supervised += 1
                prefix_alive = prefix_alive and right
                accepted += prefix_alive
    return {"loss_sum": loss, "weight": weight, "loss": loss / weight, "acc": correct / supervised,
            "simulated_acc_len": accepted / blocks}  # fmt: skip


@pytest.mark.parametrize(
    ("num_anchors", "gamma", "window", "chunk"),
    [(512, 7.0, None, 128), (3, None, None, 1), (512, 2.0, 3, 2), (4, 7.0, 6, 0)],
)
def test_loss_matches_the_block_by_block_reference(num_anchors, gamma, window, chunk) -> None:
    draft, head, embedding, batch = make_setup(sliding_window=window)
    strategy = DFlashStrategy(draft, head, embedding, num_anchors=num_anchors,
                              loss_decay_gamma=gamma, objective_chunk_blocks=chunk)  # fmt: skip
    out = strategy(batch)
    with torch.no_grad():
        want = reference(draft, head, embedding, batch, num_anchors, gamma)
    assert out.loss.item() == pytest.approx(want["loss_sum"], rel=1e-5)
    assert out.loss_weight.item() == pytest.approx(want["weight"], rel=1e-6)
    # normalisation: loss / loss_weight is the per-position weighted CE average
    assert (out.loss / out.loss_weight).item() == pytest.approx(want["loss"], rel=1e-5)
    summary = out.metrics.summary()
    for key in ("loss", "acc", "simulated_acc_len"):
        assert summary[key] == pytest.approx(want[key], rel=1e-5), key
    assert out.metrics.blocks.item() == min(num_anchors, 7) + min(num_anchors, 7)


def test_chunking_changes_neither_loss_nor_gradients() -> None:
    results = []
    for chunk in (0, 1, 3):
        draft, head, embedding, batch = make_setup(dtype=torch.float64)
        out = DFlashStrategy(draft, head, embedding, objective_chunk_blocks=chunk)(batch)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in draft.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for g, g0 in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-12)


def test_gradients_reach_the_draft_and_never_the_target() -> None:
    draft, head, embedding, batch = make_setup()
    head.requires_grad_(True)
    embedding.requires_grad_(True)
    out = DFlashStrategy(draft, head, embedding)(batch)
    out.loss.backward()
    for name, p in draft.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert head.grad is None and embedding.grad is None


def test_a_batch_without_blocks_gives_zero_with_every_parameter_in_the_graph() -> None:
    draft, head, embedding, batch = make_setup()
    batch.loss_mask[:, 1::2] = 0  # no two consecutive supervised tokens anywhere
    out = DFlashStrategy(draft, head, embedding)(batch)
    assert out.loss.item() == 0 and out.loss_weight.item() == 0
    out.loss.backward()
    assert all(p.grad is not None for p in draft.parameters())
    assert out.metrics.summary()["simulated_acc_len"] == 0


def test_from_spec_reads_the_knobs_off_the_draft_config() -> None:
    draft, head, embedding, _ = make_setup(num_anchors=9, loss_decay_gamma=None)
    spec = SimpleNamespace(draft=SimpleNamespace(config={"num_anchors": 9}))
    assert STRATEGIES.get("dflash") is DFlashStrategy and DFlashStrategy.capture_method == "dflash"
    strategy = DFlashStrategy.from_spec(spec, draft, target_head=head, target_embedding=embedding,
                                        total_steps=None)  # fmt: skip
    assert (strategy.num_anchors, strategy.loss_decay_gamma) == (9, None)
    spec = SimpleNamespace(draft=SimpleNamespace(config={"num_anchors": 10}))
    with pytest.raises(ValueError, match="num_anchors"):
        DFlashStrategy.from_spec(spec, draft, target_head=head, target_embedding=embedding,
                                 total_steps=None)  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        DFlashStrategy(draft, head[:, :8], embedding)


def test_conditional_acceptance_on_a_hand_built_example() -> None:
    t, f = True, False
    supervised = torch.tensor([[t, t, t], [t, t, f], [t, t, t], [t, f, t]])
    # right guesses at unsupervised positions must count for nothing
    hits = torch.tensor([[t, f, t], [t, t, t], [f, t, t], [t, t, t]])
    labels = torch.arange(12).view(4, 3)
    predicted = torch.where(hits, labels, labels + 100)
    weights = supervised.float() * torch.tensor([1.0, 0.5, 0.25])
    losses = torch.full((4, 3), 2.0)
    metrics = BlockMetrics.measure(losses, predicted, labels, supervised, weights)
    assert metrics.reached.tolist() == [4, 2, 0]  # block 3 stops at its unsupervised j=1
    assert metrics.reached_correct.tolist() == [3, 1, 0]
    s = metrics.summary()
    assert (s["acc_0"], s["acc_1"], s["acc_2"]) == (0.75, 0.5, 0.0)
    assert s["simulated_acc_len"] == (1 + 2 + 0 + 1) / 4
    assert s["acc"] == 8 / 10 and s["loss"] == pytest.approx(2.0) and s["ploss_1"] == 2.0
    doubled = metrics + metrics
    assert doubled.summary() == pytest.approx(s)
    assert doubled.reached.tolist() == [8, 4, 0]
    assert metrics.from_tensors(metrics.tensors()).summary() == s
    assert all(float(x.sum()) == 0 for x in metrics.zero().tensors())
    assert all(t.dtype == torch.float64 for t in metrics.tensors())


def test_overfits_one_sample_to_full_block_acceptance() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    target = tiny_target_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                head_dim=16, intermediate_size=64, vocab_size=64)  # fmt: skip
    config = DFlashConfig.from_target(target, block_size=4, mask_token_id=63)
    draft = DFlashDraft(config)
    head, embedding = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    T = 16
    loss_mask = torch.ones(1, T, dtype=torch.int64)
    loss_mask[0, :2] = 0
    batch = TrainBatch(
        input_ids=torch.randint(0, 63, (1, T), generator=gen),
        attention_mask=torch.ones(1, T, dtype=torch.int64),
        loss_mask=loss_mask,
        aux_hidden_states=torch.randn(1, T, config.target_width, generator=gen),
        seeds=torch.tensor([1]),
    )
    strategy = DFlashStrategy(draft, head, embedding, loss_decay_gamma=None)
    optimizer = torch.optim.Adam(draft.parameters(), lr=1e-2)
    full = (11 * 3 + 2 + 1) / 13  # anchors 2..14; the last two blocks run out of sequence
    for _ in range(300):  # converges in about 60 steps; stop once every block is accepted
        out = strategy(batch)
        if out.metrics.summary()["simulated_acc_len"] == pytest.approx(full):
            break
        optimizer.zero_grad()
        (out.loss / out.loss_weight).backward()
        optimizer.step()
    summary = out.metrics.summary()
    assert summary["acc"] == 1.0 and summary["acc_2"] == 1.0
    assert summary["simulated_acc_len"] == pytest.approx(full)
