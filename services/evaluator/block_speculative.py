"""Real block speculative decoding (batch size 1): one draft pass proposes a whole block.

A block drafter (DFlash, Domino) drafts from the target's context features, not from its own
chain: each round the target's captured layers of every verified position (projected once per
position, ``DFlashDraft.project_context``) are the context, and the block is
``[x, MASK, ..., MASK]`` at positions ``L .. L+bs-1``, where ``x`` is the last emitted token
(not yet seen by the target) and ``L`` the number of verified positions. One draft forward gives
the hidden states of every block position; drafted token ``j`` is read out at block position
``j + 1`` (``j`` with ``shift_label``) with the target's own ``lm_head``:

* DFlash: all drafted tokens from that one pass (argmax at temperature 0, else sampled from
  ``softmax(logits / temperature)`` over the full target vocabulary);
* Domino: the same pass, then its GRU correction runs token by token over the tokens drafted so
  far (``DominoDraft.decode_step``).

Verification, acceptance, cropping and the result's timing fields are exactly the EAGLE-3 loop's
(``speculative.py``), so both algorithms report the same columns: one target forward over
``[x, d_1..d_k]``, ``greedy_accept`` or ``speculative_accept``, the accepted positions' captured
layers extend the context. A round drafts ``min(num_draft_tokens, drafted positions per block,
remaining - 1)`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from specforge_common.dflash.blocks import block_attention_mask
from specforge_common.models.dflash import DFlashDraft, read_out
from specforge_common.models.domino import DominoDraft
from specforge_common.targets.hf import HFTargetEngine

from .acceptance import sample
from .decode_results import SpeculativeResult
from .speculative import _check_args, _choose, _cut_at_stop, _start, verify_round
from .target_session import TargetSession

__all__ = ["block_speculative_generate", "check_block_draft_fits"]


def check_block_draft_fits(engine: HFTargetEngine, draft: DFlashDraft) -> None:
    """The engine must capture the layers the draft reads, and share its vocabulary."""
    config = draft.config
    if tuple(engine.aux_layer_ids) != tuple(config.target_layer_ids):
        raise ValueError(
            f"the draft reads target layers {list(config.target_layer_ids)} but the engine "
            f"captures {list(engine.aux_layer_ids)}"
        )
    if config.vocab_size != engine.info.vocab_size:
        raise ValueError(
            f"draft target vocab {config.vocab_size} != target vocab {engine.info.vocab_size}"
        )


def _target_tables(engine: HFTargetEngine, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The target's embedding and lm_head weights, which the draft shares."""
    embedding = engine.model.get_input_embeddings().weight
    head = engine.model.get_output_embeddings().weight
    return embedding.to(dtype), head.float()


@torch.inference_mode()
def block_speculative_generate(
    engine: HFTargetEngine,
    draft: DFlashDraft,
    prompt: Sequence[int] | Tensor,
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> SpeculativeResult:
    """Decode ``prompt`` with a block drafter proposing up to ``num_draft_tokens`` per round."""
    _check_args(max_new_tokens, temperature)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    check_block_draft_fits(engine, draft)
    config = draft.config
    bs, D = config.block_size, config.num_drafted
    first = 0 if getattr(config, "shift_label", False) else 1
    k_max = min(num_draft_tokens, D)
    device, dtype = engine.device, draft.fc.weight.dtype
    embedding, head = _target_tables(engine, dtype)
    domino = isinstance(draft, DominoDraft)
    clock, stops, generator, ids = _start(engine, prompt, seed, stop_token_ids)

    started = clock()
    with TargetSession(engine, with_aux=True) as target:
        logits, layers = target.forward(ids, logits_to_keep=1)
        assert layers is not None
        context = draft.project_context(layers[None].to(dtype))  # [1, L, H]
        tokens = [_choose(logits[-1], temperature, generator)]
        result = SpeculativeResult(tokens, num_draft_tokens=k_max)
        result.prefill_seconds = clock() - started
        offsets = torch.arange(bs, device=device)

        while len(tokens) < max_new_tokens and tokens[-1] not in stops:
            t0 = clock()
            L = context.shape[1]
            k = min(k_max, max_new_tokens - len(tokens) - 1)
            drafted: list[int] = []
            q: Tensor | None = None
            if k > 0:
                anchor = torch.tensor([[L]], device=device)
                block = torch.full((1, bs), config.mask_token_id, dtype=torch.long, device=device)
                block[0, 0] = tokens[-1]
                mask = block_attention_mask(anchor, torch.ones_like(anchor, dtype=torch.bool),
                                            torch.ones(1, L, dtype=torch.long, device=device),
                                            bs, config.sliding_window)  # fmt: skip
                hidden = draft(F.embedding(block, embedding), context, (L + offsets)[None],
                               torch.arange(L, device=device)[None], mask)[0]  # fmt: skip
                drafted, q = _draft_tokens(draft, hidden[first : first + k], tokens[-1],
                                           embedding, head, temperature, generator,
                                           domino)  # fmt: skip
            t1 = clock()

            accepted, nxt, layers = verify_round(target, tokens[-1], drafted, q, temperature,
                                                 generator)  # fmt: skip
            new_context = draft.project_context(layers[None, : accepted + 1].to(dtype))
            context = torch.cat([context, new_context], dim=1)
            emitted = _cut_at_stop([*drafted[:accepted], nxt], stops)
            tokens.extend(emitted)
            t2 = clock()

            result.drafted.append(k)
            result.accepted.append(accepted)
            result.emitted.append(len(emitted))
            result.draft_seconds.append(t1 - t0)
            result.target_seconds.append(t2 - t1)
    result.wall_seconds = clock() - started
    return result


def _draft_tokens(
    draft: DFlashDraft,
    hidden: Tensor,
    anchor_token: int,
    embedding: Tensor,
    head: Tensor,
    temperature: float,
    generator: torch.Generator,
    domino: bool,
) -> tuple[list[int], Tensor | None]:
    """Tokens from the hidden states ``[k, H]`` of the drafted positions and, when sampling,
    their distributions ``[k, V]`` (what speculative sampling needs)."""
    if not domino:
        logits = read_out(hidden, head)  # [k, V]
        if temperature == 0:
            return logits.argmax(dim=-1).tolist(), None
        q = torch.softmax(logits / temperature, dim=-1)
        return [sample(row, generator) for row in q], q
    assert isinstance(draft, DominoDraft)
    tokens: list[int] = []
    rows: list[Tensor] = []
    state: Tensor | None = None
    previous = anchor_token
    for j in range(hidden.shape[0]):
        prev_embed = embedding[previous][None]
        _base, final, state = draft.decode_step(hidden[j][None], prev_embed, state, j, head)
        if temperature == 0:
            previous = int(final[0].argmax())
        else:
            row = torch.softmax(final[0] / temperature, dim=-1)
            previous = sample(row, generator)
            rows.append(row)
        tokens.append(previous)
    return tokens, (torch.stack(rows) if rows else None)
