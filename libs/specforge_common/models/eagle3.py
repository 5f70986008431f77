"""The EAGLE-3 draft (``LlamaForCausalLMEagle3``): one Llama decoder layer fed by the target.

Parameter names are exactly the SGLang layout, so ``state_dict()`` minus the frozen embedding
*is* the exported checkpoint. See ``docs/eagle3.md``, "The draft model".

Shapes: ``H`` draft hidden, ``H_t`` target hidden, ``V`` target vocab, ``V_d`` draft vocab.

    aux [B,T,3H_t] --fc--> h_0 [B,T,H]
    step k:  h_{k+1} = midlayer(embed(ids_k), h_k)     attention over the training-time-test cache
             logits_k = lm_head(norm(h_{k+1}))          [B,T,V_d]
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import DRAFT_ARCHITECTURES
from .draft import DraftModel
from .layers import (
    GatedMLP,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inverse_frequencies,
    upcast,
)
from .ttt_flex import ttt_flex_attention

ARCHITECTURE = "LlamaForCausalLMEagle3"

# Fields an auto-generated draft config copies from the target's config (spec: model_loading).
TARGET_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
    "initializer_range", "attention_bias", "attention_dropout", "head_dim", "rope_theta",
    "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
    "use_sliding_window", "max_window_layers",
)  # fmt: skip

AttentionBackend = Literal["flex", "sdpa", "reference"]
AttentionChoice = Literal["auto", "flex", "sdpa", "reference"]  # ``train.attention``


def resolve_attention(choice: AttentionChoice, device: torch.device) -> AttentionBackend:
    """``auto``: FlexAttention on CUDA (masked blocks skipped), SDPA elsewhere (PyTorch's flex
    has no CPU backward, and SDPA is the fastest CPU path)."""
    if choice == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if choice not in ("flex", "sdpa", "reference"):
        raise ValueError(f"unknown attention {choice!r}; known: auto, flex, sdpa, reference")
    return choice


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    draft_vocab_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    target_hidden_size: int | None = None
    fc_norm: bool = False
    norm_output: bool = True
    aux_layer_ids: tuple[int, ...] | None = None
    pad_token_id: int = 0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json fields, kept verbatim

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def aux_hidden_size(self) -> int:
        return self.target_hidden_size or self.hidden_size

    @classmethod
    def from_target(
        cls,
        target_config: dict[str, Any],
        *,
        draft_vocab_size: int = 32000,
        aux_layer_ids: tuple[int, ...] | None = None,
        **overrides: Any,
    ) -> Eagle3Config:
        """The spec's auto-generated draft config: the target's shape, one layer."""
        text = target_config.get("text_config", target_config)  # VLM wrappers nest it
        copied = {k: text[k] for k in TARGET_CONFIG_FIELDS if text.get(k) is not None}
        if text.get("rope_parameters"):  # transformers 5 keeps rope_theta/scaling in here
            copied["rope_parameters"] = text["rope_parameters"]
        copied.setdefault("pad_token_id", 0)
        merged = copied | {"draft_vocab_size": draft_vocab_size} | overrides
        if aux_layer_ids is not None:
            merged["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Eagle3Config:
        """Read a config.json dict (SpecForge/SGLang style; transformers-5 rope fields too)."""
        data = dict(data)
        if data.get("num_hidden_layers", 1) != 1:
            raise ValueError("an EAGLE-3 draft has exactly one decoder layer (num_hidden_layers=1)")
        rope_parameters = data.pop("rope_parameters", None) or {}
        if "rope_theta" not in data and "rope_theta" in rope_parameters:
            data["rope_theta"] = rope_parameters["rope_theta"]
        if data.get("rope_scaling") is None and rope_parameters.get("rope_type", "default") not in (
            "default",
            None,
        ):
            data["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        eagle = data.pop("eagle_config", None) or {}
        if eagle.get("eagle_aux_hidden_state_layer_ids") is not None:
            data["aux_layer_ids"] = tuple(eagle["eagle_aux_hidden_state_layer_ids"])
        known = {f.name for f in fields(cls)} - {"extra"}
        fixed_fields = ("architectures", "model_type", "num_hidden_layers", "tie_word_embeddings",
                        "use_cache")  # fmt: skip
        for fixed in fixed_fields:
            data.pop(fixed, None)
        required = (
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        )
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"draft config is missing required fields: {missing}")
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        if kwargs.get("aux_layer_ids") is not None:
            kwargs["aux_layer_ids"] = tuple(kwargs["aux_layer_ids"])
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict[str, Any]:
        """The config.json SGLang loads (``architectures: [LlamaForCausalLMEagle3]``)."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[ARCHITECTURE],
            model_type="llama",
            num_hidden_layers=1,
            tie_word_embeddings=False,
            use_cache=True,
        )
        for f in fields(self):
            if f.name not in ("extra", "aux_layer_ids", "head_dim", "target_hidden_size"):
                out[f.name] = getattr(self, f.name)
        out["head_dim"] = self.attention_head_dim
        if self.target_hidden_size is not None:
            out["target_hidden_size"] = self.target_hidden_size
        if self.aux_layer_ids is not None:
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)}
        # transformers 5 reads rope_parameters; older readers read rope_theta/rope_scaling.
        scaling = dict(self.rope_scaling or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": rope_type} | scaling
        return out


@dataclass
class TTTCache:
    """Keys and values of every training-time-test step so far, for one forward pass.

    Step k's query at position t sees step-0 keys at positions ``s <= t`` (causal, padding
    masked) and the key at the same position t of each later step ``1..k`` (the diagonal).
    """

    attention_mask: torch.Tensor  # [B, T], 1 = real token
    backend: AttentionBackend = "sdpa"
    keys: list[torch.Tensor] = field(default_factory=list)  # per step [B, n_kv, T, d], rotated
    values: list[torch.Tensor] = field(default_factory=list)
    _mask: torch.Tensor | None = None  # sdpa: [B, 1, T, T * steps] bool, grown per step

    def step0_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: causal and key not padding."""
        T = self.attention_mask.shape[1]
        device = self.attention_mask.device
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return causal[None, None] & self.attention_mask.bool()[:, None, None, :]

    def diagonal_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: only position t to itself, for real tokens."""
        T = self.attention_mask.shape[1]
        eye = torch.eye(T, dtype=torch.bool, device=self.attention_mask.device)
        return eye[None, None] & self.attention_mask.bool()[:, None, None, :]

    def sdpa_mask(self) -> torch.Tensor:
        """[B, 1, T, T * steps]; a recomputed earlier step (activation checkpointing) gets its
        own width, not the grown mask."""
        width = len(self.keys) * self.attention_mask.shape[1]
        if self._mask is None:
            self._mask = self.step0_mask()
        while self._mask.shape[-1] < width:
            self._mask = torch.cat([self._mask, self.diagonal_mask()], dim=-1)
        return self._mask[..., :width]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, n_kv, T, d] -> [B, n_kv * n_rep, T, d]; query head j uses kv head j // n_rep."""
    if n_rep == 1:
        return x
    B, n_kv, T, d = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, d).reshape(B, n_kv * n_rep, T, d)


def ttt_attention_reference(q: torch.Tensor, cache: TTTCache, scale: float) -> torch.Tensor:
    """Plain fp32 path: scores over [T causal | k diagonal], softmax over their concatenation."""
    n_rep = q.shape[1] // cache.keys[0].shape[1]
    k0, v0 = repeat_kv(cache.keys[0], n_rep), repeat_kv(cache.values[0], n_rep)
    scores = (upcast(q) @ upcast(k0).transpose(-1, -2)) * scale  # [B, h, T, T]
    scores = scores.masked_fill(~cache.step0_mask(), float("-inf"))
    real = cache.attention_mask.bool()[:, None, :]  # [B, 1, T]
    diagonal = [
        ((upcast(q) * upcast(repeat_kv(k, n_rep))).sum(-1) * scale).masked_fill(
            ~real, float("-inf")
        )
        for k in cache.keys[1:]
    ]  # each [B, h, T]
    if diagonal:
        scores = torch.cat([scores, torch.stack(diagonal, dim=-1)], dim=-1)
    probs = scores.softmax(dim=-1).to(q.dtype)
    T = q.shape[2]
    out = probs[..., :T] @ v0
    for i, v in enumerate(cache.values[1:]):
        out = out + probs[..., T + i, None] * repeat_kv(v, n_rep)
    return out


def ttt_attention_sdpa(q: torch.Tensor, cache: TTTCache, scale: float) -> torch.Tensor:
    """SDPA over all steps' keys with a boolean block mask: memory grows with the mask
    (B x T x T·steps bits), not with B x heads x T x T fp32 scores."""
    n_rep = q.shape[1] // cache.keys[0].shape[1]
    keys = repeat_kv(torch.cat(cache.keys, dim=2), n_rep)
    values = repeat_kv(torch.cat(cache.values, dim=2), n_rep)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=cache.sdpa_mask(), scale=scale)


def ttt_attention_flex(q: torch.Tensor, cache: TTTCache, scale: float) -> torch.Tensor:
    """FlexAttention over the block-sparse TTT mask (``models/ttt_flex.py``): only the key
    blocks a query can see are computed, and GQA needs no repeated keys."""
    return ttt_flex_attention(q, cache.keys, cache.values, cache.attention_mask, scale)


TTT_ATTENTION = {
    "flex": ttt_attention_flex,
    "sdpa": ttt_attention_sdpa,
    "reference": ttt_attention_reference,
}


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        width = 2 * config.hidden_size  # [norm(embedding), norm(hidden)]
        self.q_proj = nn.Linear(width, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: TTTCache
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.keys.append(k)
        cache.values.append(v)
        out = TTT_ATTENTION[cache.backend](q, cache, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.hidden_norm = RMSNorm(H, eps)
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = GatedMLP(H, config.intermediate_size, config.hidden_act)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: TTTCache,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = hidden + self.self_attn(x, cos, sin, cache)  # residual: the hidden stream
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def checkpointed_layer(
    layer: Eagle3DecoderLayer,
    embeds: torch.Tensor,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: TTTCache,
) -> torch.Tensor:
    """``layer(...)`` under activation checkpointing: only its inputs and outputs are kept and
    backward runs it again. The layer appends its key and value to the cache, a side effect the
    recomputation must not repeat and whose cache must look as it did; so the checkpointed
    function runs on a copy of the cache holding this step's past keys (inputs of the function)
    and returns the new key and value, appended here once."""
    steps = len(cache.keys)

    def run(embeds, hidden, cos, sin, *past):
        view = replace(cache, keys=list(past[:steps]), values=list(past[steps:]))
        out = layer(embeds, hidden, cos, sin, view)
        return out, view.keys[-1], view.values[-1]

    out, key, value = checkpoint(run, embeds, hidden, cos, sin, *cache.keys, *cache.values,
                                 use_reentrant=False)  # fmt: skip
    cache.keys.append(key)
    cache.values.append(value)
    return out


@DRAFT_ARCHITECTURES.register("llama_eagle3")
class Eagle3Draft(DraftModel):
    """EAGLE-3 draft. The embedding is the target's, frozen, and never exported."""

    config_class = Eagle3Config
    frozen_prefixes = ("embed_tokens.",)

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        H, H_t = config.hidden_size, config.aux_hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.embed_tokens.weight.requires_grad_(False)
        if config.fc_norm:
            self.fc_norm = nn.ModuleList(RMSNorm(H_t, config.rms_norm_eps) for _ in range(3))
        self.fc = nn.Linear(3 * H_t, H, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        # Not a buffer: ``draft.to(bfloat16)`` must not round the rotary frequencies (SGLang
        # computes them in fp32; bf16 angles are off by whole radians at long positions).
        self._inv_freq = rope_inverse_frequencies(
            config.attention_head_dim, config.rope_theta, config.rope_scaling
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
        self.embed_tokens.weight.normal_(0.0, std)

    def attach_target(self, embedding: torch.Tensor, vocab_map: Any) -> None:
        """Wire a fresh draft to its target: the frozen embedding and the draft vocab map."""
        from ..eagle3.vocab import apply_vocab_map  # the eagle3 package imports this module

        with torch.no_grad():
            self.embed_tokens.weight.copy_(embedding)
        self.embed_tokens.weight.requires_grad_(False)
        apply_vocab_map(self, vocab_map)

    def save(self, directory: str | Any) -> None:
        """The SGLang-layout export (``config.json`` + ``model.safetensors``)."""
        from ..eagle3.export import save_draft

        save_draft(self, directory)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The exported weights: everything but the frozen target embedding."""
        return {
            k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)
        }

    def project_aux(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, 3 H_t] concatenated aux layers -> h_0 [B, T, H]."""
        if self.config.fc_norm:
            chunks = aux_hidden_states.chunk(3, dim=-1)
            aux_hidden_states = torch.cat(
                [n(c) for n, c in zip(self.fc_norm, chunks, strict=True)], dim=-1
            )
        return self.fc(aux_hidden_states)

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: TTTCache,
        *,
        recompute: bool = False,
    ) -> torch.Tensor:
        """One draft step: embeddings of ``input_ids`` + previous hidden -> new raw hidden.
        ``recompute``: keep no activations of the decoder layer, recompute them in backward."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)
        cos, sin = rope_cos_sin(position_ids, self._inv_freq, hidden.dtype)
        if recompute:
            return checkpointed_layer(self.midlayer, embeds, hidden, cos, sin, cache)
        return self.midlayer(embeds, hidden, cos, sin, cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., V_d]."""
        return self.lm_head(self.norm(hidden) if self.config.norm_output else hidden)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]
