"""Real speculative decoding: the incremental draft equals the training unroll, greedy output is
lossless against HF generate, a perfect draft is accepted in full, a random one hardly at all,
and speculative sampling keeps the target distribution (chi-square tests that can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_common.batch import collate
from specforge_common.eagle3 import (
    Eagle3Strategy,
    TokenCounter,
    VocabMap,
    apply_vocab_map,
    build_vocab_map,
)
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft, TTTCache
from specforge_common.targets import HFTargetEngine, make_tiny_target
from specforge_evaluator.acceptance import greedy_accept, speculative_accept
from specforge_evaluator.decode_results import SpeculativeResult
from specforge_evaluator.draft_cache import IncrementalDraft
from specforge_evaluator.offline import evaluate_draft
from specforge_evaluator.speculative import (
    LosslessnessError,
    evaluate_speculative,
    first_difference,
    speculative_generate,
    target_generate,
)
from tests.evaluator.perfect_draft import make_perfect_draft, make_permutation_target

DRAFT_VOCAB = 128
NEW_TOKENS = 24
TTT = 4


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> HFTargetEngine:
    path = make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)
    return HFTargetEngine.from_pretrained(path)


@pytest.fixture(scope="module")
def prompts(engine: HFTargetEngine) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    V = engine.info.vocab_size
    return [torch.randint(3, V, (int(n),), generator=gen).tolist() for n in (5, 9, 12, 16, 7, 11)]


def new_draft(engine: HFTargetEngine, vocab_map: VocabMap, seed: int = 0) -> Eagle3Draft:
    model_dir = engine.model_dir
    assert model_dir is not None
    target_config = json.loads((Path(model_dir) / "config.json").read_text())
    config = Eagle3Config.from_target(
        target_config, draft_vocab_size=vocab_map.draft_vocab_size,
        aux_layer_ids=engine.aux_layer_ids,
    )  # fmt: skip
    torch.manual_seed(seed)
    draft = Eagle3Draft(config).float()
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(engine.model.model.embed_tokens.weight)
    apply_vocab_map(draft, vocab_map)
    return draft.eval()


@pytest.fixture(scope="module")
def samples(engine: HFTargetEngine, prompts: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Each prompt continued by the target's own greedy output (train-with-decode), captured;
    the loss mask covers the positions whose next token the target generated."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = engine.generate(
            ids, torch.ones_like(ids), max_new_tokens=NEW_TOKENS + 8, stop_token_ids=[]
        )[0]
        full = torch.tensor(prompt + generated)
        features = engine.capture(full[None], torch.ones(1, len(full), dtype=torch.long))
        loss_mask = torch.zeros(len(full), dtype=torch.long)
        loss_mask[len(prompt) - 1 :] = 1
        out.append({
            "input_ids": full, "loss_mask": loss_mask,
            "aux_hidden_states": features.aux_hidden_states[0].clone(),
            "hidden_states": features.hidden_states[0].clone(),
        })  # fmt: skip
    return out


@pytest.fixture(scope="module")
def vocab_map(engine: HFTargetEngine, samples) -> VocabMap:
    counter = TokenCounter()
    for s in samples:
        counter.update(s["input_ids"], s["loss_mask"])
    return build_vocab_map(counter.counts, engine.info.vocab_size, DRAFT_VOCAB)


@pytest.fixture(scope="module")
def random_draft(engine: HFTargetEngine, vocab_map: VocabMap) -> Eagle3Draft:
    return new_draft(engine, vocab_map, seed=0)


@pytest.fixture(scope="module")
def trained_draft(engine: HFTargetEngine, vocab_map: VocabMap, samples) -> Eagle3Draft:
    """Full-batch Adam on the captured greedy continuations (the eval prompts, on purpose)."""
    draft = new_draft(engine, vocab_map, seed=1)
    head = engine.model.lm_head.weight.detach().float()
    strategy = Eagle3Strategy(draft, head, ttt_length=TTT)
    optimizer = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(samples)
    draft.train()
    for _ in range(150):
        optimizer.zero_grad()
        strategy(batch).loss.backward()
        optimizer.step()
    return draft.eval()


# --- the incremental draft equals the training unroll ---------------------------------------


def unroll_logits(draft: Eagle3Draft, aux: torch.Tensor, tokens: torch.Tensor, K: int, backend):
    """Training path (Eagle3Strategy's unroll): step k at position t consumes token t+1+k."""
    T = tokens.shape[0]
    cache = TTTCache(torch.ones(1, T, dtype=torch.long), backend=backend)
    hidden = draft.project_aux(aux[None])
    positions = torch.arange(T)[None]
    ids = torch.cat([tokens[1:], tokens.new_zeros(1)])[None]
    out = []
    for k in range(K):
        hidden = draft.step(ids, hidden, positions + k, cache)
        out.append(draft.compute_logits(hidden)[0])
        ids = torch.cat([ids[:, 1:], ids.new_zeros(1, 1)], dim=1)
    return out  # K x [T, V_d]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_incremental_draft_equals_training_unroll(backend: str) -> None:
    torch.manual_seed(0)
    config = Eagle3Config(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=40, draft_vocab_size=40, target_hidden_size=32, rope_theta=500.0,
        initializer_range=0.2,
    )  # fmt: skip
    draft = Eagle3Draft(config).eval()
    T, K = 16, 4
    aux = torch.randn(T, 3 * 32)
    tokens = torch.randint(0, 40, (T,))
    with torch.no_grad():
        expected = unroll_logits(draft, aux, tokens, K, backend)
        incremental = IncrementalDraft(draft)
        start = 0
        for end in (5, 6, 9, 12):  # accepted chunks of 5, 1, 3 and 3 positions
            hidden = incremental.extend(aux[start:end], tokens[start + 1 : end + 1])
            torch.testing.assert_close(
                draft.compute_logits(hidden), expected[0][start:end], atol=1e-5, rtol=1e-5
            )
            t, h = end - 1, hidden[-1]
            for j in range(1, K):  # chain step j at t consumes token t+1+j
                h = incremental.chain_step(tokens[t + 1 + j], h, j)
                torch.testing.assert_close(
                    draft.compute_logits(h), expected[j][t], atol=1e-5, rtol=1e-5
                )
            incremental.clear_chain()
            assert incremental.length == end  # chain keys are gone, step-0 keys stay
            start = end


# --- acceptance rules ----------------------------------------------------------------------


def test_greedy_accept_on_constructed_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    V, k = 11, 5
    for _ in range(200):
        logits = torch.randn(k + 1, V, generator=gen)
        argmax = logits.argmax(-1)
        # Drafts that follow the target for a random number of tokens, then (maybe) diverge.
        agree = int(torch.randint(0, k + 1, (1,), generator=gen))
        drafts = argmax[:k].clone()
        if agree < k:
            drafts[agree] = (argmax[agree] + 1 + torch.randint(0, V - 1, (1,), generator=gen)) % V
            drafts[agree + 1 :] = torch.randint(0, V, (k - agree - 1,), generator=gen)
        # Independent formula: accepted = length of the all-match prefix, via a cumulative product.
        matches = (drafts == argmax[:k]).long().cumprod(0)
        want = int(matches.sum())
        assert want == agree
        assert greedy_accept(argmax, drafts.tolist()) == (want, int(argmax[want]))
    assert greedy_accept(torch.tensor([3, 4, 5]), [3, 4]) == (2, 5)  # all accepted: bonus
    assert greedy_accept(torch.tensor([3, 4, 5]), [7, 4]) == (0, 3)  # first rejected: correction
    assert greedy_accept(torch.tensor([9]), []) == (0, 9)  # nothing drafted: a plain step


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; p-value from the regularised upper gamma."""
    expected = probs.double() * counts.sum()
    assert expected.min() >= 5, "too few expected counts per cell for the chi-square test"
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def always_accept(p, q, draft_tokens, generator):
    """A deliberately wrong sampler: trusts the draft blindly."""
    return len(draft_tokens), int(torch.multinomial(p[len(draft_tokens)], 1, generator=generator))


def first_token_counts(sampler, p, q, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1], dtype=torch.long)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(q.shape[0])]
        accepted, nxt = sampler(p, q, drafts, gen)
        counts[drafts[0] if accepted >= 1 else nxt] += 1
    return counts


def test_speculative_accept_keeps_the_target_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    V, k, n = 8, 2, 4000
    p = torch.softmax(1.2 * torch.randn(k + 1, V, generator=gen), dim=-1)
    q = torch.softmax(1.2 * torch.randn(k, V, generator=gen), dim=-1)
    q[:, 0] = 0  # a token outside the draft vocab
    q = q / q.sum(-1, keepdim=True)
    assert (p[0] - q[0]).abs().sum() > 0.5  # far apart: many rejections, residual sampling used
    good = first_token_counts(speculative_accept, p, q, n, seed=1)
    assert chi_square_p_value(good, p[0]) > 1e-3
    bad = first_token_counts(always_accept, p, q, n, seed=1)
    assert chi_square_p_value(bad, p[0]) < 1e-3  # the test can fail


def test_speculative_accept_with_identical_distributions_accepts_everything() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 6, generator=gen), dim=-1)
    for _ in range(50):
        drafts = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
        accepted, _ = speculative_accept(p, p[:3].clone(), drafts, gen)
        assert accepted == 3


def small_vocab_target(V: int = 12, seed: int = 0) -> HFTargetEngine:
    """A random Llama over 12 tokens with a sharp head, so p is far from the draft's q."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return HFTargetEngine(model, aux_layer_ids=(0, 0, 1))


def test_speculative_sampling_end_to_end_keeps_the_target_distribution() -> None:
    """The second generated token is the first one a verification step emits; its marginal
    ``sum_u p(u | prompt) p(v | prompt, u)`` comes from plain target forwards."""
    engine = small_vocab_target()
    V, V_d = engine.info.vocab_size, 9
    used = torch.tensor([0, 1, 2, 4, 5, 6, 8, 10, 11])  # 3, 7 and 9 cannot be drafted
    vocab_map = VocabMap(d2t=used - torch.arange(V_d), t2d=torch.isin(torch.arange(V), used))
    config = Eagle3Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, draft_vocab_size=V_d, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(1)
    draft = Eagle3Draft(config).float().eval()
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(engine.model.model.embed_tokens.weight)
    apply_vocab_map(draft, vocab_map)

    prompt, temperature, n = [4, 9, 1], 1.0, 800
    with torch.no_grad():
        first = torch.softmax(engine.forward_logits(torch.tensor([prompt]))[0, -1], -1)
        continued = torch.tensor([prompt + [u] for u in range(V)])
        second = torch.softmax(engine.forward_logits(continued)[:, -1], -1)  # [u, v]
    marginal = first @ second

    # max_new_tokens = k + 2: the first verification step drafts all k = 2 tokens.
    report = evaluate_speculative(
        engine, draft, [prompt] * n, num_draft_tokens=2, max_new_tokens=4,
        temperature=temperature, seed=0,
    )  # fmt: skip
    assert report.lossless is None
    assert all(r.drafted[0] == 2 for r in report.results)
    counts = torch.zeros(V, dtype=torch.long)
    for r in report.results:
        counts[r.tokens[1]] += 1
    accepted = sum(r.accepted[0] >= 1 for r in report.results) / n
    assert 0.1 < accepted < 0.9  # both the accept and the residual path are exercised
    assert counts[[3, 7, 9]].sum() > 0  # tokens the draft cannot propose still come out
    assert chi_square_p_value(counts, marginal) > 1e-3


def test_sampling_is_reproducible_with_a_seed(engine, random_draft, prompts) -> None:
    def run(seed: int) -> list[int]:
        result = speculative_generate(engine, random_draft, prompts[0], num_draft_tokens=3,
                                      max_new_tokens=12, temperature=0.8, seed=seed)  # fmt: skip
        return result.tokens

    assert run(5) == run(5)
    assert run(5) != run(6)


# --- losslessness and acceptance on the tiny target ----------------------------------------


def test_random_draft_is_lossless_and_hardly_accepted(engine, random_draft, prompts) -> None:
    report = evaluate_speculative(
        engine, random_draft, prompts, num_draft_tokens=3, max_new_tokens=NEW_TOKENS
    )
    assert report.lossless is True
    assert report.steps > 0
    assert 1.0 <= report.acceptance_length < 1.3
    # The plain KV-cache loop is the same greedy decode.
    for prompt, result in zip(prompts, report.results, strict=True):
        assert target_generate(engine, prompt, max_new_tokens=NEW_TOKENS).tokens == result.tokens


def test_trained_draft_is_lossless_and_accepted(
    engine, random_draft, trained_draft, prompts, samples
) -> None:
    k = 3
    trained = evaluate_speculative(
        engine, trained_draft, prompts, num_draft_tokens=k, max_new_tokens=NEW_TOKENS
    )
    assert trained.lossless is True
    random = evaluate_speculative(
        engine, random_draft, prompts, num_draft_tokens=k, max_new_tokens=NEW_TOKENS
    )
    head = engine.model.lm_head.weight.detach().float()
    simulated = evaluate_draft(trained_draft, head, samples, ttt_length=k, batch_size=3)
    sim = simulated.simulated_acceptance_length()
    serving = trained.acceptance_length
    print(f"trained: serving {serving:.3f} (random {random.acceptance_length:.3f}), "
          f"simulated {sim:.3f}, per position {trained.per_position_acceptance()}")  # fmt: skip
    assert sim > 1.0
    assert serving > 1 + 0.5 * sim
    assert serving > random.acceptance_length + 1.0
    assert len(trained.per_position_acceptance()) == k


def test_perfect_draft_accepts_the_whole_chain_every_step() -> None:
    engine, pi = make_permutation_target()
    draft = make_perfect_draft(engine, pi)
    prompt = [5, 9, 17, 30]
    for k, max_new in ((1, 9), (3, 20), (5, 25)):
        report = evaluate_speculative(engine, draft, [prompt], num_draft_tokens=k,
                                      max_new_tokens=max_new)  # fmt: skip
        result = report.results[0]
        assert report.lossless is True and len(result.tokens) == max_new
        assert result.accepted[:-1] == [k] * (result.steps - 1)
        assert result.drafted[:-1] == [k] * (result.steps - 1)
        last = (max_new - 1) % (k + 1) or k + 1  # tokens the final step may still emit
        assert result.drafted[-1] == result.accepted[-1] == last - 1
        assert result.emitted == [k + 1] * (result.steps - 1) + [last]
        assert result.acceptance_length == pytest.approx((max_new - 1) / result.steps)
        assert report.per_position_acceptance() == [1.0] * k


def test_stop_token_inside_an_accepted_chain_cuts_the_output() -> None:
    engine, pi = make_permutation_target()
    draft = make_perfect_draft(engine, pi)
    prompt = [5, 9, 17, 30]
    orbit = [pi[prompt[-1]]]
    while len(orbit) < 12:
        orbit.append(pi[orbit[-1]])
    stop = orbit[6]  # the 7th generated token
    report = evaluate_speculative(engine, draft, [prompt], num_draft_tokens=4, max_new_tokens=30,
                                  stop_token_ids=[stop])  # fmt: skip
    result = report.results[0]
    assert result.tokens == orbit[:7]
    assert report.lossless is True
    # prefill emits 1; step 1 emits 5; step 2 accepts all 4 drafts but only 1 token survives.
    assert result.accepted == [4, 4] and result.emitted == [5, 1]


# --- the losslessness check itself ---------------------------------------------------------


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([1], [1, 4]) == 1


def test_a_wrong_reference_raises_losslessness_error(
    engine, random_draft, prompts, monkeypatch
) -> None:
    """The check compares against engine.generate; a reference that differs must be caught."""
    true_generate = engine.generate

    def shifted(*args, **kwargs):
        rows = true_generate(*args, **kwargs)
        return [row[:4] + [(row[4] + 1) % engine.info.vocab_size] + row[5:] for row in rows]

    monkeypatch.setattr(engine, "generate", shifted)
    with pytest.raises(LosslessnessError) as info:
        evaluate_speculative(engine, random_draft, prompts[2:], num_draft_tokens=2,
                             max_new_tokens=10)  # fmt: skip
    assert (info.value.prompt_index, info.value.position) == (0, 4)
    assert info.value.expected == (info.value.got + 1) % engine.info.vocab_size
    assert "prompt 0" in str(info.value) and "position 4" in str(info.value)


def test_per_position_acceptance_formula() -> None:
    result = SpeculativeResult(tokens=[0] * 9, num_draft_tokens=3, drafted=[3, 3, 3, 2],
                               accepted=[2, 0, 3, 2], emitted=[3, 1, 4, 3])  # fmt: skip
    # position 0: tried 4, accepted 3; position 1: tried 3 (a >= 1), accepted 3;
    # position 2: tried where a >= 2 and drafted > 2 (steps 0 and 2), accepted 1.
    assert result.per_position_acceptance() == [0.75, 1.0, 0.5]
    assert result.acceptance_length == pytest.approx(11 / 4)


def test_rejects_bad_arguments(engine, random_draft) -> None:
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(engine, random_draft, [5], num_draft_tokens=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(engine, random_draft, [5], num_draft_tokens=2, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        speculative_generate(engine, random_draft, [], num_draft_tokens=2, max_new_tokens=4)
