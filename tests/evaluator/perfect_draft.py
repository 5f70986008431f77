"""A target whose greedy next token is a known permutation, and a draft that predicts it exactly.

Used by the speculative-decoding tests (acceptance must be the full chain every round) and by
``bench/speculative.py`` (the upper bound of the speedup).

Target (Llama, untied head, ``H >= V``): every attention ``o_proj`` and MLP ``down_proj`` is zero,
so each layer adds nothing and every hidden state is the token's embedding; the embedding rows
are one-hot ``e_x`` and ``lm_head`` is the permutation matrix of ``pi``, so the logits after the
final norm are ``c * e_pi(x)`` and the greedy next token of ``x`` is ``pi(x)``. The layers still
do all their matmuls, so the target costs what an ordinary model of its shape costs.

Draft (identity vocab map, hidden ``H``): ``fc`` passes the first aux chunk (``e_x`` of the
position's own token), attention ``o_proj`` is zero, and the MLP turns ``e_x`` into ``e_pi(x)``
(one intermediate unit per token, ``down_proj`` writes ``e_pi(x) - e_x``). So step 0 at position
t outputs ``e_{x_{t+1}}`` and predicts ``pi(x_{t+1}) = x_{t+2}``; each chain step advances the
hidden by ``pi`` again. ``pi`` fixes the special ids 0..2 (EOS = 2) and cycles the others, so a
prompt of ordinary ids never produces EOS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft
from specforge_common.targets import HFTargetEngine

SPECIAL = 3  # ids 0 (pad), 1 (bos), 2 (eos) are fixed points of pi


def cycle_permutation(vocab_size: int, seed: int = 0) -> list[int]:
    """pi: one random cycle through the ids >= SPECIAL, fixed points below."""
    gen = torch.Generator().manual_seed(seed)
    order = (torch.randperm(vocab_size - SPECIAL, generator=gen) + SPECIAL).tolist()
    pi = list(range(vocab_size))
    for a, b in zip(order, order[1:] + order[:1], strict=True):
        pi[a] = b
    return pi


def make_permutation_target(
    vocab_size: int = 64,
    hidden_size: int = 64,
    *,
    num_layers: int = 5,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[HFTargetEngine, list[int]]:
    """The target engine (on ``device`` in ``dtype``: one-hot rows and a permutation head are
    exact in bf16 too) and its greedy successor map ``pi``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size < vocab_size:
        raise ValueError("one-hot embeddings need hidden_size >= vocab_size")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    pi = cycle_permutation(vocab_size, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size, hidden_size))
        head = torch.zeros(vocab_size, hidden_size)
        head[pi, torch.arange(vocab_size)] = 1.0  # logits[pi(x)] from e_x
        model.lm_head.weight.copy_(head)
    return HFTargetEngine(model.to(device, dtype)), pi


def make_perfect_draft(engine: HFTargetEngine, pi: list[int], *, seed: int = 0) -> Eagle3Draft:
    """A draft that predicts the permutation target's greedy tokens exactly (module docstring)."""
    info = engine.info
    V, H = info.vocab_size, info.hidden_size
    config = Eagle3Config(
        hidden_size=H, intermediate_size=V, num_attention_heads=info.num_attention_heads,
        num_key_value_heads=info.num_key_value_heads, vocab_size=V, draft_vocab_size=V,
        head_dim=info.head_dim, aux_layer_ids=engine.aux_layer_ids,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = Eagle3Draft(config).float()
    eye = torch.eye(V, H)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(engine.model.model.embed_tokens.weight)
        draft.t2d.fill_(True)
        draft.d2t.zero_()
        draft.fc.weight.zero_()
        draft.fc.weight[:, :H] = torch.eye(H)
        draft.midlayer.self_attn.o_proj.weight.zero_()
        # post_attention_layernorm(e_x) = s * e_x; gate and up read 1.0 on unit x, 0 elsewhere.
        s = float(torch.rsqrt(torch.tensor(1.0 / H) + config.rms_norm_eps))
        mlp = draft.midlayer.mlp
        mlp.gate_proj.weight.copy_(eye / s)
        mlp.up_proj.weight.copy_(eye / s)
        unit = float(F.silu(torch.tensor(1.0)))  # the intermediate activation of unit x
        down = torch.zeros(H, V)
        for x in range(V):
            down[pi[x], x] += 1.0 / unit
            down[x, x] -= 1.0 / unit
        mlp.down_proj.weight.copy_(down)
        head = torch.zeros(V, H)
        head[pi, torch.arange(V)] = 1.0
        draft.lm_head.weight.copy_(head)
    return draft.eval()
