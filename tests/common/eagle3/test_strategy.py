"""The EAGLE-3 TTT strategy against an independent, slow, loop-based reference in float64.

The reference below is written from the spec's formulas only (it shares no code with the
implementation beyond reading the draft's parameters): per-token RMSNorm, RoPE pair rotation,
attention as explicit score lists over the allowed keys, teacher and metrics by loops.
"""

from __future__ import annotations

import math

import pytest
import torch

from specforge_common.batch import TrainBatch
from specforge_common.eagle3.strategy import Eagle3Metrics, Eagle3Strategy
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft, TTTCache

V, V_D, H, HEADS, KV_HEADS, INTER = 24, 12, 16, 4, 2, 32
B, T, K = 2, 7, 3
LENGTHS = (7, 5)  # the second row is right-padded


def make_setup(dtype=torch.float64, seed=0, fc_norm=False):
    gen = torch.Generator().manual_seed(seed)
    config = Eagle3Config(
        hidden_size=H, intermediate_size=INTER, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=V, draft_vocab_size=V_D, rope_theta=50.0,
        initializer_range=0.3, fc_norm=fc_norm,
    )  # fmt: skip
    torch.manual_seed(seed)
    draft = Eagle3Draft(config).to(dtype)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight") or ".0.weight" in name or ".1." in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=dtype))
    used = torch.randperm(V, generator=gen)[:V_D].sort().values
    draft.t2d.zero_()
    draft.t2d[used] = True
    draft.d2t.copy_(used - torch.arange(V_D))
    head = torch.randn(V, H, generator=gen, dtype=dtype)
    attention = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        attention[b, :n] = 1
    loss_mask = attention.clone()
    loss_mask[0, :2] = 0  # a prompt part that is not supervised
    batch = TrainBatch(
        input_ids=torch.randint(0, V, (B, T), generator=gen) * attention,
        attention_mask=attention,
        loss_mask=loss_mask,
        aux_hidden_states=torch.randn(B, T, 3 * H, generator=gen, dtype=dtype),
        hidden_states=torch.randn(B, T, H, generator=gen, dtype=dtype),
    )
    # Make some teacher argmaxes fall outside the draft vocab and some inside.
    return draft, head, batch, used


# --- the reference -----------------------------------------------------------------------


def rms(x, w, eps):
    return w * x / math.sqrt(float((x * x).mean()) + eps)


def rope(x, pos, theta):
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = pos * theta ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


def reference(draft: Eagle3Draft, head, batch: TrainBatch, K: int, decay: float = 0.8):
    sd = {k: v.detach().to(torch.float64) for k, v in draft.state_dict().items()}
    cfg = draft.config
    eps, d = cfg.rms_norm_eps, cfg.attention_head_dim
    group = HEADS // KV_HEADS
    used = sd["t2d"].nonzero().flatten().tolist()
    ids, lm = batch.input_ids.tolist(), batch.loss_mask.tolist()
    lengths = batch.attention_mask.sum(1).tolist()

    # Teacher, by loops.
    p, pod, y, pm = {}, {}, {}, {}
    for b in range(B):
        for t in range(T):
            h = batch.hidden_states[b, t + 1].double() if t + 1 < T else torch.zeros(H).double()
            logits = head.double() @ h
            y[b, t] = int(logits.argmax())
            pm[b, t] = float(sd["t2d"][y[b, t]]) * lm[b][t]
            sub = logits[used]
            p[b, t] = torch.softmax(sub, 0)
            pod[b, t] = torch.exp(sub - torch.logsumexp(logits, 0))

    def teacher_at(b, t):  # row t of the padded teacher
        if t < T:
            return p[b, t], pod[b, t], y[b, t], pm[b, t], lm[b][t]
        return torch.full((V_D,), 1 / V_D).double(), torch.zeros(V_D).double(), 0, 0.0, 0

    def token(b, t, k):  # ids_k[t] = input_ids[t + 1 + k], zero past the end
        j = t + 1 + k
        return ids[b][j] if j < T else 0

    def proj(name, x):
        return sd[name] @ x

    hidden = {(b, t): proj("fc.weight", batch.aux_hidden_states[b, t].double())
              for b in range(B) for t in range(T)}  # fmt: skip
    keys, values = {}, {}  # (step, b, t) -> [KV_HEADS, d]
    results = []
    for k in range(K):
        queries, new_hidden = {}, {}
        for b in range(B):
            for t in range(T):
                emb = sd["embed_tokens.weight"][token(b, t, k)]
                e = rms(emb, sd["midlayer.input_layernorm.weight"], eps)
                x = torch.cat([e, rms(hidden[b, t], sd["midlayer.hidden_norm.weight"], eps)])
                q = proj("midlayer.self_attn.q_proj.weight", x).view(HEADS, d)
                kk = proj("midlayer.self_attn.k_proj.weight", x).view(KV_HEADS, d)
                vv = proj("midlayer.self_attn.v_proj.weight", x).view(KV_HEADS, d)
                pos = t + k
                queries[b, t] = torch.stack([rope(q[h], pos, cfg.rope_theta) for h in range(HEADS)])
                keys[k, b, t] = torch.stack([rope(kk[h], pos, cfg.rope_theta)
                                             for h in range(KV_HEADS)])  # fmt: skip
                values[k, b, t] = vv
        for b in range(B):
            for t in range(T):
                allowed = [(0, s) for s in range(t + 1) if s < lengths[b]]
                if t < lengths[b]:
                    allowed += [(i, t) for i in range(1, k + 1)]
                heads_out = []
                for h in range(HEADS):
                    q = queries[b, t][h]
                    scores = torch.stack(
                        [q @ keys[i, b, s][h // group] / math.sqrt(d) for i, s in allowed]
                    )
                    w = torch.softmax(scores, 0)
                    heads_out.append(sum(w[j] * values[i, b, s][h // group]
                                         for j, (i, s) in enumerate(allowed)))  # fmt: skip
                attn = proj("midlayer.self_attn.o_proj.weight", torch.cat(heads_out))
                h1 = hidden[b, t] + attn
                z = rms(h1, sd["midlayer.post_attention_layernorm.weight"], eps)
                gate = proj("midlayer.mlp.gate_proj.weight", z)
                up = proj("midlayer.mlp.up_proj.weight", z)
                mlp = proj("midlayer.mlp.down_proj.weight", gate * torch.sigmoid(gate) * up)
                new_hidden[b, t] = h1 + mlp
        hidden = new_hidden
        ploss, correct, denom, accept, accept_denom = 0.0, 0.0, 0.0, 0.0, 0.0
        for b in range(B):
            for t in range(T):
                logits = sd["lm_head.weight"] @ rms(hidden[b, t], sd["norm.weight"], eps)
                log_q = torch.log_softmax(logits, 0)
                p_t, pod_t, y_t, pm_t, lm_t = teacher_at(b, t + k)
                ploss += -pm_t * float((p_t * log_q).sum())
                draft_id = int(logits.argmax())
                correct += lm_t * float(draft_id + int(sd["d2t"][draft_id]) == y_t)
                denom += lm_t
                accept += pm_t * float(torch.minimum(pod_t, log_q.exp()).sum())
                accept_denom += pm_t
        results.append(
            {
                "ploss": ploss / (B * T),
                "acc": correct / max(denom, 1),
                "accept": accept / max(accept_denom, 1),
            }  # fmt: skip
        )
    loss = sum(decay**k * r["ploss"] for k, r in enumerate(results))
    return loss, results


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["reference", "sdpa", "flex"])
def test_loss_accuracy_and_acceptance_match_the_loop_reference(attention: str) -> None:
    draft, head, batch, _ = make_setup()
    out = Eagle3Strategy(draft, head, ttt_length=K, attention=attention)(batch)
    ref_loss, ref = reference(draft, head, batch, K)
    summary = out.metrics.summary()
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-6, rel=1e-9)
    for k in range(K):
        assert summary[f"ploss_{k}"] == pytest.approx(ref[k]["ploss"], abs=1e-6)
        assert summary[f"acc_{k}"] == pytest.approx(ref[k]["acc"], abs=1e-6)
        assert summary[f"acceptance_rate_{k}"] == pytest.approx(ref[k]["accept"], abs=1e-6)
    assert summary["loss"] == pytest.approx(ref_loss, abs=1e-6)


def test_acceptance_rate_is_averaged_over_the_position_mask_not_the_loss_mask() -> None:
    """``acceptance_rate_k = sum_t pm_k[t] * sum_v min(p_on_draft_k[t, v], q_k[t, v]) /
    sum_t pm_k[t]`` with ``pm = t2d[argmax target] * loss_mask`` shifted left by k, computed here
    from plain formulas; ``acc_k`` stays on the loss mask. Also pooled over two batches."""
    from specforge_common.eagle3.teacher import shift_left

    draft, head, batch, used = make_setup()
    logits = shift_left(batch.hidden_states) @ head.T  # [B, T, V]: the target at t+1
    target_ids = logits.argmax(-1)
    position_mask = torch.isin(target_ids, used).double() * batch.loss_mask
    on_draft = logits.softmax(-1)[..., used]  # target probability of each draft token
    assert not torch.equal(position_mask, batch.loss_mask.double())  # the case under test

    def rows(x: torch.Tensor, k: int) -> torch.Tensor:  # x[:, t + k], zero past the end
        return torch.cat([x[:, k:], torch.zeros_like(x[:, :k])], dim=1)

    expected, on_loss_mask, expected_acc = [], [], []
    for k, draft_logits in enumerate(step_logits(draft, batch, K)):
        q = draft_logits.softmax(-1)
        overlap = torch.minimum(rows(on_draft, k), q).sum(-1)  # [B, T]
        pm, lm = rows(position_mask, k), rows(batch.loss_mask.double(), k)
        expected.append(float((overlap * pm).sum() / pm.sum()))
        on_loss_mask.append(float((overlap * lm).sum() / lm.sum()))
        drafted = used[draft_logits.argmax(-1)]  # draft id -> target id
        expected_acc.append(float(((drafted == rows(target_ids, k)) * lm).sum() / lm.sum()))
    # The old (loss-mask) average differs, so this test tells the two conventions apart.
    assert max(abs(a - b) for a, b in zip(expected, on_loss_mask, strict=True)) > 1e-3

    strategy = Eagle3Strategy(draft, head, ttt_length=K)
    first = batch.rows(slice(0, 1))
    second = batch.rows(slice(1, None))
    for metrics in (strategy(batch).metrics, strategy(first).metrics + strategy(second).metrics):
        summary = metrics.summary()
        for k in range(K):
            assert summary[f"acceptance_rate_{k}"] == pytest.approx(expected[k], abs=1e-6)
            assert summary[f"acc_{k}"] == pytest.approx(expected_acc[k], abs=1e-6)
        assert summary["acceptance_rate"] == pytest.approx(sum(expected) / K, abs=1e-6)


def test_metrics_rebuild_from_their_tensors_in_field_order() -> None:
    """What ``all_reduce_metrics`` relies on: ``Eagle3Metrics(*m.tensors(), ...)`` is ``m``."""
    draft, head, batch, _ = make_setup()
    m = Eagle3Strategy(draft, head, ttt_length=K)(batch).metrics
    rebuilt = Eagle3Metrics(*m.tensors(), step_weight_decay=m.step_weight_decay)
    assert rebuilt.summary() == m.summary()
    assert not torch.equal(m.accept_denom, m.denom)


def test_teacher_has_targets_inside_and_outside_the_draft_vocab() -> None:
    """The setup exercises the position mask: otherwise the comparison above proves less."""
    draft, head, batch, used = make_setup()
    argmax = (batch.hidden_states[:, 1:] @ head.T).argmax(-1)
    inside = torch.isin(argmax, used)
    assert inside.any() and (~inside).any()


@pytest.mark.parametrize("chunk_rows", [1, 3, B * T, 10 * B * T])
def test_teacher_in_row_chunks_equals_the_whole_batch_at_once(chunk_rows: int) -> None:
    """Chunking only bounds memory: every teacher tensor matches one computed from the whole
    ``[B, T, V]`` logits by the independent formulas of the spec."""
    from specforge_common.eagle3.teacher import prepare_teacher, shift_left

    draft, head, batch, used = make_setup()
    teacher = prepare_teacher(batch, head, draft.t2d, K, chunk_rows=chunk_rows)
    logits = shift_left(batch.hidden_states) @ head.T  # fp64, whole
    draft_logits = logits[..., used]
    assert torch.equal(teacher.target_ids[:, :T], logits.argmax(-1))
    torch.testing.assert_close(teacher.target_p[:, :T], draft_logits.softmax(-1), rtol=0,
                               atol=1e-12)  # fmt: skip
    on_draft = draft_logits.exp() / logits.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(teacher.p_on_draft[:, :T], on_draft, rtol=1e-9, atol=1e-12)
    assert torch.equal(teacher.position_mask,
                       torch.isin(logits.argmax(-1), used) * batch.loss_mask)  # fmt: skip
    assert torch.all(teacher.target_p[:, T:] == 1.0 / V_D)


def test_float32_matches_the_float64_reference() -> None:
    draft, head, batch, _ = make_setup()
    ref_loss, _ = reference(draft, head, batch, K)
    draft32 = draft.float()
    batch32 = batch.to("cpu", dtype=torch.float32)
    out = Eagle3Strategy(draft32, head.float(), ttt_length=K)(batch32)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)


def loss_metrics_and_grads(draft: Eagle3Draft, head, batch: TrainBatch, **options):
    """One strategy call and backward: (loss, metric summary, gradient of every parameter)."""
    draft.zero_grad()
    out = Eagle3Strategy(draft, head, ttt_length=K, **options)(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.metrics.summary(), grads


def assert_same_step(a, b, atol: float = 1e-10, rtol: float = 1e-8) -> None:
    (loss_a, summary_a, grads_a), (loss_b, summary_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=rtol)
    assert summary_a == pytest.approx(summary_b, abs=atol, rel=rtol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_attention_backends_agree_with_the_reference_in_value_and_gradient(attention) -> None:
    draft, head, batch, _ = make_setup(seed=3)
    reference = loss_metrics_and_grads(draft, head, batch, attention="reference")
    assert_same_step(loss_metrics_and_grads(draft, head, batch, attention=attention), reference)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 5])
def test_the_loss_in_token_chunks_equals_the_loss_at_once(chunk_tokens: int) -> None:
    """Loss, metrics and gradients (T=7: the chunks do not divide it; the batch has a padded
    row and unsupervised prompt positions)."""
    draft, head, batch, _ = make_setup(seed=4)
    whole = loss_metrics_and_grads(draft, head, batch, loss_chunk_tokens=0)
    chunked = loss_metrics_and_grads(draft, head, batch, loss_chunk_tokens=chunk_tokens)
    assert_same_step(chunked, whole)


@pytest.mark.parametrize("attention", ["reference", "sdpa", "flex"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(attention: str) -> None:
    draft, head, batch, _ = make_setup(seed=5)
    kept = loss_metrics_and_grads(draft, head, batch, attention=attention)
    recomputed = loss_metrics_and_grads(draft, head, batch, attention=attention,
                                        activation_checkpointing=True)  # fmt: skip
    assert_same_step(recomputed, kept)


def test_activation_checkpointing_keeps_far_less_for_backward() -> None:
    """What autograd holds after the forward: without checkpointing every step's MLP and
    attention activations; with it, the layer's inputs and outputs (and the logits)."""
    from tests.common.eagle3.test_soft_cross_entropy import saved_bytes

    draft, head, batch, _ = make_setup()
    kept = {}
    for recompute in (False, True):
        strategy = Eagle3Strategy(draft, head, ttt_length=K, activation_checkpointing=recompute)
        kept[recompute] = saved_bytes(lambda s=strategy: s(batch))
    assert kept[True] < 0.5 * kept[False], kept


def test_bf16_precision_is_refused_on_cpu() -> None:
    draft, head, _, _ = make_setup()
    with pytest.raises(ValueError, match="train.precision bf16 needs a CUDA device"):
        Eagle3Strategy(draft, head, ttt_length=K, precision="bf16")
    assert Eagle3Strategy(draft, head, ttt_length=K, precision="auto").precision == "fp32"


def test_teacher_probabilities_stored_in_bf16_are_rounded_by_at_most_2_to_the_minus_8() -> None:
    """The bound docs/eagle3.md quotes for ``precision: bf16`` (which stores them so on CUDA):
    each probability within 2^-8 of itself (round to nearest, 8 significant bits)."""
    from specforge_common.eagle3.teacher import prepare_teacher

    draft, head, batch, _ = make_setup(dtype=torch.float32)
    exact = prepare_teacher(batch, head, draft.t2d, K)
    rounded = prepare_teacher(batch, head, draft.t2d, K, probs_dtype=torch.bfloat16)
    assert rounded.target_p.dtype == rounded.p_on_draft.dtype == torch.bfloat16
    for name in ("target_p", "p_on_draft"):
        a, b = getattr(exact, name), getattr(rounded, name).float()
        assert torch.all((a - b).abs() <= 2**-8 * a.abs()), name
        assert not torch.equal(a, b)  # rounding did happen
    assert torch.equal(exact.target_ids, rounded.target_ids)
    assert torch.equal(exact.position_mask, rounded.position_mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_and_flex_on_cuda_stay_close_to_fp32_reference() -> None:
    """The CUDA defaults (flex, bf16 autocast, bf16 teacher probabilities) against the fp32
    reference path on the same device: bf16 rounding, nothing worse."""
    draft, head, batch, _ = make_setup(dtype=torch.float32, seed=6)
    draft, head, batch = draft.cuda(), head.cuda(), batch.to("cuda")
    exact = loss_metrics_and_grads(draft, head, batch, attention="reference", precision="fp32")
    fast = loss_metrics_and_grads(draft, head, batch, attention="auto", precision="auto",
                                  activation_checkpointing=True)  # fmt: skip
    torch.testing.assert_close(fast[0], exact[0], atol=2e-2, rtol=2e-2)
    for name, g in exact[2].items():
        assert (
            torch.nn.functional.cosine_similarity(fast[2][name].flatten(), g.flatten(), dim=0)
            > 0.99
        ), name


def test_gradients_reach_only_trainable_parameters() -> None:
    draft, head, batch, _ = make_setup()
    head.requires_grad_(True)
    Eagle3Strategy(draft, head, ttt_length=K)(batch).loss.backward()
    assert draft.embed_tokens.weight.grad is None
    assert head.grad is None
    for name, param in draft.named_parameters():
        if not name.startswith("embed_tokens"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def step_logits(draft: Eagle3Draft, batch: TrainBatch, steps: int) -> list[torch.Tensor]:
    """Raw draft logits of each TTT step, as the strategy computes them."""
    from specforge_common.eagle3.teacher import shift_left

    ids = shift_left(batch.input_ids)
    hidden = draft.project_aux(batch.aux_hidden_states)
    cache = TTTCache(batch.attention_mask)
    positions = torch.arange(T).expand(B, T)
    out = []
    for k in range(steps):
        hidden = draft.step(ids, hidden, positions + k, cache)
        out.append(draft.compute_logits(hidden).detach())
        ids = shift_left(ids)
    return out


@pytest.mark.parametrize("t", [1, 3])
def test_no_future_leakage(t: int) -> None:
    """Step k at position t reads tokens up to t+1+k and aux features up to t, nothing later."""
    draft, _, batch, _ = make_setup()
    base = step_logits(draft, batch, K)
    for k in range(K):
        changed = TrainBatch(**vars(batch))
        changed.input_ids = batch.input_ids.clone()
        changed.input_ids[:, t + 2 + k :] = (changed.input_ids[:, t + 2 + k :] + 1) % V
        changed.aux_hidden_states = batch.aux_hidden_states.clone()
        changed.aux_hidden_states[:, t + 1 :] += 1.0
        after = step_logits(draft, changed, K)
        torch.testing.assert_close(after[k][:, : t + 1], base[k][:, : t + 1], atol=0, rtol=0)
        # ... while the token at t+1+k does matter at position t (the test can fail).
        nudged = TrainBatch(**vars(batch))
        nudged.input_ids = batch.input_ids.clone()
        nudged.input_ids[:, t + 1 + k] = (nudged.input_ids[:, t + 1 + k] + 1) % V
        assert not torch.equal(step_logits(draft, nudged, K)[k][:, t], base[k][:, t])


def test_step_k_attends_to_its_own_earlier_steps_on_the_diagonal_only() -> None:
    """The cached step-i key at position s != t must not influence step k at t."""
    draft, _, batch, _ = make_setup()
    ids = batch.input_ids
    hidden = draft.project_aux(batch.aux_hidden_states)
    cache = TTTCache(batch.attention_mask, backend="reference")
    positions = torch.arange(T).expand(B, T)
    hidden = draft.step(ids, hidden, positions, cache)
    hidden = draft.step(ids, hidden, positions + 1, cache)
    # Perturb the step-1 key/value at position 4 only, then run step 2.
    base_cache = TTTCache(batch.attention_mask, "reference", [k.clone() for k in cache.keys],
                          [v.clone() for v in cache.values])  # fmt: skip
    cache.keys[1][:, :, 4] += 3.0
    cache.values[1][:, :, 4] += 3.0
    out = draft.step(ids, hidden, positions + 2, cache).detach()
    ref = draft.step(ids, hidden, positions + 2, base_cache).detach()
    changed = (out - ref).abs().amax(dim=-1) > 0  # [B, T]
    assert changed[0].tolist() == [t == 4 for t in range(T)]


def test_simulated_acceptance_length_has_no_bonus_token() -> None:
    m = Eagle3Metrics.zeros(2)
    m.correct[:] = torch.tensor([8.0, 4.0])
    m.denom[:] = torch.tensor([10.0, 10.0])
    assert m.simulated_acceptance_length() == pytest.approx(0.8 + 0.8 * 0.4)


def test_metrics_add_up_over_batches_before_ratios() -> None:
    draft, head, batch, _ = make_setup()
    strategy = Eagle3Strategy(draft, head, ttt_length=K)
    first = batch.rows(slice(0, 1))
    second = batch.rows(slice(1, None))
    both = strategy(first).metrics + strategy(second).metrics
    whole = strategy(batch).metrics
    for a, b in zip(both.tensors()[1:], whole.tensors()[1:], strict=True):  # counts are exact
        torch.testing.assert_close(a, b)


def test_fc_norm_variant_runs_and_normalizes_each_chunk() -> None:
    draft, head, batch, _ = make_setup(fc_norm=True)
    assert {f"fc_norm.{i}.weight" for i in range(3)} <= set(draft.state_dict())
    scaled = TrainBatch(**vars(batch))
    scaled.aux_hidden_states = batch.aux_hidden_states * 7.0  # RMSNorm per chunk removes scale
    a = draft.project_aux(batch.aux_hidden_states)
    b = draft.project_aux(scaled.aux_hidden_states)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_overfits_a_handful_of_samples() -> None:
    """Plain AdamW on 4 samples drives step-0 accuracy on them above 0.9 (fp32, CPU)."""
    torch.manual_seed(0)
    Vt, Vd, Ht, Tt = 64, 32, 32, 24
    config = Eagle3Config(hidden_size=Ht, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=Vt, draft_vocab_size=Vd)  # fmt: skip
    draft = Eagle3Draft(config)
    draft.t2d[:Vd] = True
    head = torch.randn(Vt, Ht)
    # Teacher argmaxes inside the draft vocab: push hidden states toward rows < Vd.
    targets = torch.randint(0, Vd, (4, Tt))
    hidden = 3.0 * torch.nn.functional.normalize(head[targets], dim=-1) + 0.1 * torch.randn(
        4, Tt, Ht
    )
    batch = TrainBatch(
        input_ids=torch.randint(0, Vt, (4, Tt)),
        attention_mask=torch.ones(4, Tt, dtype=torch.long),
        loss_mask=torch.ones(4, Tt, dtype=torch.long),
        aux_hidden_states=torch.randn(4, Tt, 3 * Ht),
        hidden_states=hidden,
    )
    strategy = Eagle3Strategy(draft, head, ttt_length=2)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        out = strategy(batch)
        out.loss.backward()
        optimizer.step()
    assert out.metrics.summary()["acc_0"] > 0.9
