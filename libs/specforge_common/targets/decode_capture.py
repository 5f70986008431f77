"""Decode mode in one pass: the target writes its replies and the features come with them.

Capture in decode mode used to cost two passes over every reply token: generation (one KV-cache
step per token), then a full forward over prompt + reply for the hidden states. The steps of
generation already compute those states, so ``generate_and_capture`` keeps them: the prefill
gives the prompt's, each step the new token's, and one last step feeds the final tokens so
every token of prompt + reply has its features. On SmolLM2-135M that is one target forward per
token instead of two (``bench/capture.py`` measures it).

Each prompt is prefilled alone, so no prefill compute goes to padding; the rows' caches are then
left-padded into one batch that steps together with explicit position ids. A finished row keeps
stepping on pad tokens until the batch is done (its later states are dropped). Greedy rows take the
argmax; sampled rows draw from ``softmax(logits / temperature)`` with their own seeded generator, so
a row's reply depends on its seed, not on its batch mates (up to float rounding of a padded batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .hf import HFTargetEngine


@dataclass
class Generated:
    """One row: the reply and the features of prompt + reply, on the CPU."""

    reply: list[int]  # cut after its first stop token (kept)
    aux_hidden_states: Tensor  # [len(prompt) + len(reply), 3H]
    hidden_states: Tensor  # [len(prompt) + len(reply), H], after the final norm


@torch.inference_mode()
def generate_and_capture(
    engine: HFTargetEngine,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    seeds: Sequence[int | None] | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> list[Generated]:
    """Replies to ``prompts`` (token ids) with every token's features; ``max_new_tokens`` may be
    given per row."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows, device = len(prompts), engine.device
    limits = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    stops = set(engine.info.eos_token_ids if stop_token_ids is None else stop_token_ids)
    generators = None
    if temperature > 0:
        generators = []
        for seed in seeds or [None] * rows:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
            generators.append(generator)

    from transformers import DynamicCache

    # Each prompt is prefilled alone (no padding: a batch padded to its longest prompt spends
    # most of its prefill on pads), then the rows' caches are left-padded into one batch.
    prefills = [_prefill(engine, prompt) for prompt in prompts]
    width = max(len(p) for p in prompts)
    cache = DynamicCache(ddp_cache_data=_left_padded_cache([c for c, _, _ in prefills], width))
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, prompt in enumerate(prompts):
        mask[r, width - len(prompt) :] = 1
    positions = torch.tensor([[len(p) - 1] for p in prompts], dtype=torch.long, device=device)
    logits = torch.cat([last for _, _, last in prefills])

    pad = engine.pad_token_id
    steps: list[tuple[Tensor, Tensor]] = []  # (aux [B, 1, 3H], final [B, 1, H]) per step
    replies: list[list[int]] = [[] for _ in range(rows)]
    done = [limit <= 0 for limit in limits]
    while not all(done):
        tokens = _choose(logits, temperature, generators)
        for r, token in enumerate(tokens):
            if done[r]:
                tokens[r] = pad  # finished earlier: steps on, its states are dropped
                continue
            replies[r].append(token)
            done[r] = token in stops or len(replies[r]) >= limits[r]
        step_ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long, device=device)], dim=1)
        positions = positions + 1
        logits = _step(engine, step_ids, mask, positions, cache, steps)

    out = []
    for r, (_, (prompt_aux, prompt_final), _) in enumerate(prefills):
        n = len(replies[r])
        aux = [prompt_aux] + [a[r] for a, _ in steps[:n]]
        final = [prompt_final] + [f[r] for _, f in steps[:n]]
        out.append(Generated(replies[r], torch.cat(aux).cpu(), torch.cat(final).cpu()))
    return out


def _prefill(
    engine: HFTargetEngine, prompt: Sequence[int]
) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor], Tensor]:
    """One prompt alone: its per-layer (keys, values), features ([n, 3H], [n, H]) and the
    logits [1, V] of its last position."""
    from transformers import DynamicCache

    ids = torch.as_tensor([list(prompt)], dtype=torch.long, device=engine.device)
    cache = DynamicCache()
    steps: list[tuple[Tensor, Tensor]] = []
    logits = _step(engine, ids, torch.ones_like(ids), None, cache, steps)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    ((aux, final),) = steps
    return layers, (aux[0], final[0]), logits


def _left_padded_cache(
    rows: Sequence[list[tuple[Tensor, Tensor]]], width: int
) -> list[tuple[Tensor, Tensor]]:
    """Per layer, the rows' ``[1, heads, n, d]`` keys and values left-padded with zeros into
    ``[B, heads, width, d]`` (the attention mask hides the pads)."""
    merged = []
    for layer in zip(*rows, strict=True):
        keys, values = layer[0]
        shape = (len(rows), keys.shape[1], width, keys.shape[3])
        k_all, v_all = keys.new_zeros(shape), values.new_zeros(shape)
        for r, (k, v) in enumerate(layer):
            k_all[r, :, width - k.shape[2] :] = k[0]
            v_all[r, :, width - v.shape[2] :] = v[0]
        merged.append((k_all, v_all))
    return merged


def _step(
    engine: HFTargetEngine,
    ids: Tensor,
    mask: Tensor,
    positions: Tensor | None,
    cache: object,
    steps: list[tuple[Tensor, Tensor]],
) -> Tensor:
    """One forward with the cache: keeps the new positions' features, returns the last logits."""
    with engine.aux_outputs(ids.shape) as aux:
        out = engine.base(input_ids=ids, attention_mask=mask, position_ids=positions,
                          cache=cache, use_cache=True)  # fmt: skip
    final = out.last_hidden_state
    engine.fill_final(aux, final)
    steps.append((aux, final))
    return engine.model.lm_head(final[:, -1]).float()


def _choose(logits: Tensor, temperature: float, generators: list | None) -> list[int]:
    if temperature == 0 or generators is None:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, dim=-1)
    return [int(torch.multinomial(p, 1, generator=g))
            for p, g in zip(probs, generators, strict=True)]  # fmt: skip
