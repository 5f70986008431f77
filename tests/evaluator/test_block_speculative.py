"""Real block speculative decoding: lossless against HF generate for any block drafter (greedy),
speculative sampling runs and accounts for every round, and a DFlash draft overfit to the
target's own greedy reply has every drafted token of every block accepted in the real loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specforge_common.batch import collate
from specforge_common.dflash import DFlashStrategy
from specforge_common.models.dflash import DFlashConfig, DFlashDraft
from specforge_common.models.domino import DominoConfig, DominoDraft
from specforge_common.targets import HFTargetEngine, make_tiny_target
from specforge_evaluator.block_speculative import block_speculative_generate
from specforge_evaluator.speculative import evaluate_speculative, greedy_references
from tests.evaluator.perfect_draft import make_permutation_target

NEW_TOKENS = 20
BLOCK = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> HFTargetEngine:
    path = make_tiny_target(tmp_path_factory.mktemp("target") / "llama", arch="llama", seed=0)
    return HFTargetEngine.from_pretrained(path, capture_method="dflash")


@pytest.fixture(scope="module")
def prompts(engine: HFTargetEngine) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    V = engine.info.vocab_size
    return [torch.randint(3, V, (int(n),), generator=gen).tolist() for n in (6, 9, 13)]


def target_config(engine: HFTargetEngine) -> dict:
    assert engine.model_dir is not None
    return json.loads((Path(engine.model_dir) / "config.json").read_text())


def new_draft(engine: HFTargetEngine, *, domino: bool = False, seed: int = 0) -> DFlashDraft:
    config_cls, cls = (DominoConfig, DominoDraft) if domino else (DFlashConfig, DFlashDraft)
    extra = {"gru_hidden_dim": 16, "correction_dim": 16} if domino else {}
    config = config_cls.from_target(target_config(engine), aux_layer_ids=engine.aux_layer_ids,
                                    block_size=BLOCK, **extra)  # fmt: skip
    torch.manual_seed(seed)
    return cls(config).float().eval()


@pytest.mark.parametrize("domino", [False, True])
def test_greedy_block_decoding_is_lossless_with_an_untrained_draft(
    engine: HFTargetEngine, prompts: list[list[int]], domino: bool
) -> None:
    draft = new_draft(engine, domino=domino)
    # evaluate_speculative raises LosslessnessError at the first token that differs
    report = evaluate_speculative(engine, draft, prompts, num_draft_tokens=BLOCK - 1,
                                  max_new_tokens=NEW_TOKENS)  # fmt: skip
    assert report.lossless is True
    assert report.tokens == sum(len(r.tokens) for r in report.results)
    for result in report.results:  # every round drafted at most a block, emitted accepted + 1
        assert all(k <= BLOCK - 1 for k in result.drafted)
        emitted, accepted = result.emitted, result.accepted
        assert emitted[:-1] == [a + 1 for a in accepted[:-1]]  # the last may stop early
        assert 1 <= emitted[-1] <= accepted[-1] + 1


def test_sampled_block_decoding_accounts_for_every_round(
    engine: HFTargetEngine, prompts: list[list[int]]
) -> None:
    draft = new_draft(engine, domino=True, seed=1)
    result = block_speculative_generate(engine, draft, prompts[0], num_draft_tokens=2,
                                        max_new_tokens=NEW_TOKENS, temperature=0.8,
                                        seed=5)  # fmt: skip
    again = block_speculative_generate(engine, draft, prompts[0], num_draft_tokens=2,
                                       max_new_tokens=NEW_TOKENS, temperature=0.8,
                                       seed=5)  # fmt: skip
    assert result.tokens == again.tokens  # seeded: the same draws
    assert len(result.tokens) == NEW_TOKENS
    assert 1 + sum(result.emitted) == len(result.tokens)  # the first token is the prefill's
    assert all(0 <= a <= k for a, k in zip(result.accepted, result.drafted, strict=True))


def test_a_draft_overfit_to_the_targets_reply_has_every_block_accepted() -> None:
    """On the permutation target (greedy next token of x is pi(x), a well-conditioned head), a
    DFlash draft trained on the target's own greedy reply to a prompt, at every anchor, fits it
    exactly; the real decoding loop then accepts every drafted token of every block."""
    permutation_engine, _pi = make_permutation_target()
    engine = HFTargetEngine(permutation_engine.model, capture_method="dflash")
    prompt = [5, 17, 33, 9, 40, 22]
    reply = greedy_references(engine, [prompt], max_new_tokens=NEW_TOKENS)[0]
    ids = torch.tensor(prompt + reply)
    out = engine.capture(ids[None], torch.ones(1, len(ids), dtype=torch.int64))
    loss_mask = torch.zeros(len(ids), dtype=torch.int64)
    loss_mask[len(prompt) - 1 :] = 1  # the anchors: the last prompt token and the reply
    sample = {"input_ids": ids, "loss_mask": loss_mask,
              "aux_hidden_states": out.aux_hidden_states[0].clone()}  # fmt: skip
    config = DFlashConfig.from_target(
        engine.model.config.to_dict(), aux_layer_ids=engine.aux_layer_ids, block_size=BLOCK
    )
    torch.manual_seed(0)
    draft = DFlashDraft(config).float()
    head = engine.model.get_output_embeddings().weight.detach().float()
    embedding = engine.model.get_input_embeddings().weight.detach().float()
    strategy = DFlashStrategy(draft, head, embedding, num_anchors=len(ids),
                              loss_decay_gamma=None)  # fmt: skip
    optimizer = torch.optim.Adam(draft.parameters(), lr=1e-2)
    batch = collate([sample], seeds=[0])
    for _ in range(300):
        output = strategy(batch)
        (output.loss / output.loss_weight).backward()
        optimizer.step()
        optimizer.zero_grad()
        if output.metrics.summary()["acc"] == 1.0:
            break
    assert output.metrics.summary()["simulated_acc_len"] == pytest.approx(BLOCK - 1, abs=0.2)

    result = block_speculative_generate(engine, draft.eval(), prompt, num_draft_tokens=BLOCK - 1,
                                        max_new_tokens=NEW_TOKENS)  # fmt: skip
    assert result.tokens == reply
    assert result.accepted == result.drafted  # every drafted token of every block
    assert result.drafted[:-1] == [BLOCK - 1] * (len(result.drafted) - 1)  # whole blocks
    assert result.acceptance_length == pytest.approx(
        len(reply[1:]) / len(result.drafted))  # fmt: skip
