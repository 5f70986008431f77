"""Slow references for the block drafters, written from the spec's formulas with loops.

They read the draft's parameters but share none of its code: RMSNorm, RoPE pair rotation,
attention as explicit score lists over allowed keys, the GRU cell equations, CE by log-sum-exp.
"""

from __future__ import annotations

import math

import torch

from specforge_common.models.dflash import DFlashConfig, DFlashDraft


def tiny_target_config(**fields: object) -> dict[str, object]:
    """A hand-written target config.json: 8 layers, hidden 16, vocab 40."""
    config: dict[str, object] = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 16,
        "intermediate_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "num_hidden_layers": 8, "vocab_size": 40, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "rope_theta": 50.0, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": [2, 3], "tie_word_embeddings": False,
    }  # fmt: skip
    config.update(fields)
    return config


def randomize_norms(draft: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights away from 1 so a test notices a norm that is skipped or misapplied."""
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt((x * x).mean() + eps))


def rotate(v: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """RoPE on one head vector: pair (i, i + d/2) turned by ``position * theta^(-2i/d)``."""
    d = v.shape[0]
    out = v.clone()
    for i in range(d // 2):
        angle = position * theta ** (-2.0 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = v[i] * c - v[i + d // 2] * s
        out[i + d // 2] = v[i + d // 2] * c + v[i] * s
    return out


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def reference_forward(
    draft: DFlashDraft,
    embeds: torch.Tensor,
    context: torch.Tensor,
    q_positions: list[int],
    ctx_positions: list[int],
    allowed: list[list[bool]],
) -> torch.Tensor:
    """One sequence: embeds [Q, H], projected context [C, H], ``allowed[i][j]`` over the C + Q
    keys. A query with no allowed key gets no attention update."""
    cfg: DFlashConfig = draft.config
    nh, nkv, d, eps = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.rms_norm_eps)  # fmt: skip
    Q = embeds.shape[0]
    key_positions = list(ctx_positions) + list(q_positions)
    x = embeds.clone()
    for layer in draft.layers:
        att = layer.self_attn
        normed = torch.stack([rms(x[i], layer.input_layernorm.weight, eps) for i in range(Q)])
        kv_in = torch.cat([context, normed])
        keys, values = [], []
        for j in range(kv_in.shape[0]):
            k_all, v_all = att.k_proj.weight @ kv_in[j], att.v_proj.weight @ kv_in[j]
            keys.append([rotate(rms(k_all[g * d : (g + 1) * d], att.k_norm.weight, eps),
                                key_positions[j], cfg.rope_theta) for g in range(nkv)])  # fmt: skip
            values.append([v_all[g * d : (g + 1) * d] for g in range(nkv)])
        update = torch.zeros_like(x)
        for i in range(Q):
            if not any(allowed[i]):
                continue
            q_all = att.q_proj.weight @ normed[i]
            heads = []
            for h in range(nh):
                g = h // (nh // nkv)
                q = rotate(rms(q_all[h * d : (h + 1) * d], att.q_norm.weight, eps),
                           q_positions[i], cfg.rope_theta)  # fmt: skip
                js = [j for j in range(len(allowed[i])) if allowed[i][j]]
                scores = torch.stack([(q * keys[j][g]).sum() / math.sqrt(d) for j in js])
                p = torch.softmax(scores, dim=0)
                heads.append(sum(p[n] * values[j][g] for n, j in enumerate(js)))
            update[i] = att.o_proj.weight @ torch.cat(heads)
        x = x + update
        mlp = layer.mlp
        for i in range(Q):
            h = rms(x[i], layer.post_attention_layernorm.weight, eps)
            x[i] = x[i] + mlp.down_proj.weight @ (
                silu(mlp.gate_proj.weight @ h) * (mlp.up_proj.weight @ h)
            )
    return torch.stack([rms(x[i], draft.norm.weight, eps) for i in range(Q)])


def cross_entropy(logits: torch.Tensor, label: int) -> torch.Tensor:
    return torch.logsumexp(logits, dim=0) - logits[label]


def gru_cell(gru: torch.nn.GRU, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One step of a bias-free GRU (gate rows ordered reset, update, new)."""
    G = h.shape[0]
    w_i, w_h = gru.weight_ih_l0, gru.weight_hh_l0
    r = torch.sigmoid(w_i[:G] @ x + w_h[:G] @ h)
    z = torch.sigmoid(w_i[G : 2 * G] @ x + w_h[G : 2 * G] @ h)
    n = torch.tanh(w_i[2 * G :] @ x + r * (w_h[2 * G :] @ h))
    return (1 - z) * n + z * h
