"""Domino: the lambda schedule, the GRU correction (teacher forced = step-wise), the mixed loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from specforge_common.batch import TrainBatch
from specforge_common.dflash.anchors import sample_anchors
from specforge_common.dflash.domino import DominoStrategy, lambda_schedule
from specforge_common.models.domino import DominoConfig, DominoDraft
from specforge_common.registry import STRATEGIES

from .reference import cross_entropy, gru_cell, randomize_norms, silu, tiny_target_config

V, H, BS, G, E = 40, 16, 5, 12, 6


def make_setup(shift: bool, prefix: int = 1, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(1)
    config = DominoConfig.from_target(
        tiny_target_config(), block_size=BS, mask_token_id=V - 1, initializer_range=0.2,
        gru_hidden_dim=G, correction_dim=E, pure_draft_prefix_len=prefix, shift_label=shift,
    )  # fmt: skip
    torch.manual_seed(1)
    draft = DominoDraft(config).to(dtype)
    randomize_norms(draft, gen)
    head = torch.randn(V, H, generator=gen, dtype=dtype)
    embedding = torch.randn(V, H, generator=gen, dtype=dtype)
    T = 12
    attention = torch.ones(2, T, dtype=torch.int64)
    attention[1, 10:] = 0
    loss_mask = attention.clone()
    loss_mask[:, :2] = 0
    loss_mask[0, 7] = 0
    batch = TrainBatch(
        input_ids=torch.randint(0, V - 1, (2, T), generator=gen) * attention,
        attention_mask=attention,
        loss_mask=loss_mask,
        aux_hidden_states=torch.randn(2, T, config.target_width, generator=gen, dtype=dtype),
        seeds=torch.tensor([7, 8]),
    )
    return draft, head, embedding, batch


def test_lambda_decays_linearly_and_clamps() -> None:
    assert lambda_schedule(0, 100, 1.0, 1.0) == 1.0
    assert lambda_schedule(50, 100, 1.0, 1.0) == pytest.approx(0.5)
    assert lambda_schedule(100, 100, 1.0, 1.0) == 0.0
    assert lambda_schedule(150, 100, 1.0, 1.0) == 0.0  # clamped below
    assert lambda_schedule(25, 100, 1.0, 0.5) == pytest.approx(0.5)
    assert lambda_schedule(10, 100, 0.8, 1.0) == pytest.approx(0.72)
    assert lambda_schedule(0, 100, 2.0, 1.0) == 1.0  # clamped above
    assert lambda_schedule(5, None, 1.0, 0.0) == 0.0  # no decay horizon: already decayed


def test_a_decaying_schedule_refuses_a_missing_horizon() -> None:
    draft, head, embedding, _ = make_setup(shift=True)
    for total in (None, 0):
        with pytest.raises(ValueError, match="total_steps"):
            DominoStrategy(draft, head, embedding, total_steps=total)
    spec = SimpleNamespace(draft=SimpleNamespace(config={}))
    with pytest.raises(ValueError, match="total_steps"):
        DominoStrategy.from_spec(spec, draft, target_head=head, target_embedding=embedding,
                                 total_steps=None)  # fmt: skip
    strategy = DominoStrategy.from_spec(spec, draft, target_head=head, target_embedding=embedding,
                                        total_steps=40)  # fmt: skip
    assert STRATEGIES.get("domino") is DominoStrategy and strategy.capture_method == "dflash"
    strategy.set_step(10)
    assert strategy.lambda_base == pytest.approx(0.75)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_step_wise_decoding_equals_teacher_forcing(prefix: int) -> None:
    draft, head, embedding, _ = make_setup(shift=True, prefix=prefix)
    gen = torch.Generator().manual_seed(2)
    N, D = 3, draft.config.num_drafted
    hidden = torch.randn(N, D, H, generator=gen, dtype=torch.float64)
    prev = torch.randn(N, D, H, generator=gen, dtype=torch.float64)
    base, final = draft.block_logits(hidden, prev, head)
    state = None
    for j in range(D):
        b_j, f_j, state = draft.decode_step(hidden[:, j], prev[:, j], state, j, head)
        torch.testing.assert_close(b_j, base[:, j], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f_j, final[:, j], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final[:, :prefix], base[:, :prefix])
    assert (final[:, prefix:] - base[:, prefix:]).abs().min() > 0


def test_correction_follows_the_gru_equations() -> None:
    draft, head, embedding, _ = make_setup(shift=False, prefix=1)
    gen = torch.Generator().manual_seed(3)
    D = draft.config.num_drafted
    hidden = torch.randn(D, H, generator=gen, dtype=torch.float64)
    prev = torch.randn(D, H, generator=gen, dtype=torch.float64)
    base, final = draft.block_logits(hidden[None], prev[None], head)
    state = torch.zeros(G, dtype=torch.float64)
    w1, w2 = draft.embed_proj[0].weight, draft.embed_proj[2].weight
    for j in range(D):
        state = gru_cell(draft.prefix_gru, prev[j], state)
        want = head @ hidden[j]
        torch.testing.assert_close(base[0, j], want)
        if j >= 1:
            want = want + w2 @ silu(w1 @ torch.cat([hidden[j], state]))
        torch.testing.assert_close(final[0, j], want)


def reference(draft: DominoDraft, head, embedding, batch: TrainBatch, lam: float, gamma: float,
              ) -> tuple[float, float, float]:  # fmt: skip
    """Block by block in block-position terms: position k's label, the GRU over the tokens
    before it, the correction from ``suffix_start`` on, the mixed CE."""
    cfg = draft.config
    bs, shift, p = cfg.block_size, cfg.shift_label, cfg.pure_draft_prefix_len
    suffix_start = p if shift else 1 + p
    anchors, valid = sample_anchors(batch.loss_mask, batch.attention_mask, batch.seeds, 512)
    w1, w2 = draft.embed_proj[0].weight, draft.embed_proj[2].weight
    loss = weight = accepted = blocks = 0.0
    for b in range(2):
        ids, lm = batch.input_ids[b].tolist(), batch.loss_mask[b].tolist()
        length = int(batch.attention_mask[b].sum())
        for anchor, ok in zip(anchors[b].tolist(), valid[b].tolist(), strict=True):
            if not ok:
                continue
            blocks += 1
            tokens = [ids[anchor]] + [cfg.mask_token_id] * (bs - 1)
            context = draft.project_context(batch.aux_hidden_states[b : b + 1, :anchor])
            q_pos = torch.arange(anchor, anchor + bs)[None]
            hidden = draft(embedding[tokens][None], context, q_pos, torch.arange(anchor)[None],
                           torch.ones(1, bs, anchor + bs, dtype=torch.bool))[0]  # fmt: skip
            state = torch.zeros(G, dtype=hidden.dtype)
            alive = True
            for k in range(0, bs) if shift else range(1, bs):
                index = anchor + k + 1 if shift else anchor + k
                # the GRU has read every token before the label: anchor .. index - 1
                state = gru_cell(draft.prefix_gru, embedding[ids[min(index - 1, len(ids) - 1)]],
                                 state)  # fmt: skip
                base = head @ hidden[k]
                final = base
                if k >= suffix_start:
                    final = base + w2 @ silu(w1 @ torch.cat([hidden[k], state]))
                if index >= length or not lm[index]:
                    alive = False
                    continue
                w = math.exp(-(k if shift else k - 1) / gamma)
                mixed = (1 - lam) * cross_entropy(final, ids[index]) + lam * cross_entropy(
                    base, ids[index]
                )
                loss += w * mixed.item()
                weight += w
                alive = alive and int(final.argmax()) == ids[index]
                accepted += alive
    return loss, weight, (accepted + blocks) / blocks


@pytest.mark.parametrize(
    ("shift", "prefix", "step"), [(True, 1, 10), (False, 1, 30), (False, 0, 0)]
)
def test_mixed_loss_matches_the_block_by_block_reference(shift: bool, prefix: int, step: int
                                                         ) -> None:  # fmt: skip
    draft, head, embedding, batch = make_setup(shift=shift, prefix=prefix)
    strategy = DominoStrategy(draft, head, embedding, total_steps=40, lambda_base_start=1.0,
                              lambda_base_decay_ratio=1.0, objective_chunk_blocks=3)  # fmt: skip
    strategy.set_step(step)
    lam = strategy.lambda_base
    assert lam == pytest.approx(1 - step / 40)
    out = strategy(batch)
    with torch.no_grad():
        loss, weight, accept_len = reference(draft, head, embedding, batch, lam, 7.0)
    # the loss weights are float32 (exact for 0/1, ~1e-8 relative for the decay)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.loss_weight.item() == pytest.approx(weight, rel=1e-6)
    summary = out.metrics.summary()
    assert summary["accept_len"] == pytest.approx(accept_len)
    assert summary["simulated_acc_len"] == pytest.approx(accept_len - 1)
    assert summary["loss"] == pytest.approx(
        (1 - lam) * summary["final_loss"] + lam * summary["base_loss"]
    )
    assert 0 <= summary["base_acc"] <= 1
    out.loss.backward()
    grads = {n: p.grad for n, p in draft.named_parameters()}
    assert all(g is not None for g in grads.values())
    if lam < 1:
        assert grads["embed_proj.0.weight"].abs().sum() > 0
        assert grads["prefix_gru.weight_hh_l0"].abs().sum() > 0
