"""The DFlash draft (``DFlashDraftModel``): a Qwen3-style stack that drafts a whole block at once.

It has no embedding and no lm_head of its own: block tokens are embedded with the target's frozen
``embed_tokens`` and hidden states are read out with the target's frozen ``lm_head``, both held by
the caller, so neither ever appears in ``state_dict()``. Parameter names are the reference
layout (``fc``, ``hidden_norm``, ``layers.i.*``, ``norm``).

Shapes: ``H`` draft hidden (= target hidden, the embedding is shared), ``n`` captured target
layers, ``C`` context positions, ``Q`` block query tokens (all blocks of a sequence together).

    target layers [B,C,n*H_t] --fc--> --hidden_norm--> context [B,C,H]      (project_context)
    block embeds  [B,Q,H]  (target embedding of [anchor token, MASK, MASK, ...] per block)
    each layer:   q = q_norm(q_proj(ln(x)))                          [B,h,Q,d], RoPE at q_positions
                  k = k_norm(k_proj([context ; ln(x)]))              [B,h_kv,C+Q,d], RoPE at
                  v =        v_proj([context ; ln(x)])                 [ctx_positions ; q_positions]
                  x = x + o_proj(attention(q, k, v, attn_mask))      non-causal, mask [B,Q,C+Q]
                  x = x + mlp(post_ln(x))
    hidden = norm(x) [B,Q,H];   logits = hidden @ target_head.T   (by the caller)
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import DRAFT_ARCHITECTURES
from .draft import DraftModel
from .eagle3 import TARGET_CONFIG_FIELDS, repeat_kv
from .layers import (
    GatedMLP,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inverse_frequencies,
    upcast,
)

ARCHITECTURE = "DFlashDraftModel"

# A target's sliding-window settings describe the target's layers, not the draft's.
_COPIED_FIELDS = tuple(
    f for f in TARGET_CONFIG_FIELDS
    if f not in ("sliding_window", "use_sliding_window", "max_window_layers")
)  # fmt: skip
_FIXED_FIELDS = ("architectures", "model_type", "tie_word_embeddings", "use_cache", "auto_map",
                 "use_sliding_window", "layer_types")  # fmt: skip


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """The default captured layers: the middle one for a 1-layer draft, else ``n`` spread evenly
    from layer 1 (``round(1 + i (N_t - 4) / (n - 1))``)."""
    if num_draft_layers < 1:
        raise ValueError(f"a DFlash draft has at least one layer, not {num_draft_layers}")
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    span = (num_target_layers - 4) / (num_draft_layers - 1)
    return tuple(round(1 + i * span) for i in range(num_draft_layers))


def read_out(hidden: torch.Tensor, target_head: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] in at least fp32: ``hidden @ target_head.T`` (pass the head upcast once,
    not per call, when the draft runs in low precision)."""
    hidden = upcast(hidden)
    return hidden @ target_head.to(hidden.dtype).T


def _default_mask_token_id(text: dict[str, Any]) -> int:
    """The target's mask token, else its pad token, else its first eos token, else 0."""
    for key in ("mask_token_id", "pad_token_id", "eos_token_id"):
        value = text.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@dataclass
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # the target's: block drafters read out with the target's lm_head
    num_hidden_layers: int = 1
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    target_hidden_size: int | None = None
    target_layer_ids: tuple[int, ...] = ()
    block_size: int = 16
    mask_token_id: int = 0
    sliding_window: int | None = None  # every layer: keys within the last W positions
    initializer_range: float = 0.02
    # Training knobs the strategy reads (run overrides land here, so one place holds them).
    num_anchors: int = 512
    loss_decay_gamma: float | None = 7.0  # None: no decay over block positions
    objective_chunk_blocks: int = 128  # blocks per vocab projection; 0: all at once
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json fields, verbatim

    # Keys config.json nests under ``dflash_config`` (the reference layout).
    nested_keys: ClassVar[tuple[str, ...]] = ("mask_token_id", "target_layer_ids")

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.target_layer_ids = tuple(int(i) for i in self.target_layer_ids)
        if not self.target_layer_ids:
            raise ValueError("a DFlash draft needs target_layer_ids (the captured layers)")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, not {self.block_size}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, not {self.sliding_window}")

    @property
    def num_drafted(self) -> int:
        """Predicted positions per block: every position but the given anchor token."""
        return self.block_size - 1

    @property
    def target_width(self) -> int:
        """Width of one captured position: ``n`` target layers concatenated."""
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    @classmethod
    def from_target(
        cls,
        target_config: dict[str, Any],
        *,
        draft_vocab_size: int = 0,
        aux_layer_ids: tuple[int, ...] | None = None,
        **overrides: Any,
    ) -> DFlashConfig:
        """The auto-generated draft config: the target's shape, one layer, the default layers.
        ``draft_vocab_size`` is ignored: block drafters use the target vocabulary."""
        del draft_vocab_size
        text = target_config.get("text_config", target_config)  # VLM wrappers nest it
        copied = {k: text[k] for k in _COPIED_FIELDS if text.get(k) is not None}
        if text.get("rope_parameters"):  # transformers 5 keeps rope_theta/scaling in here
            copied["rope_parameters"] = text["rope_parameters"]
        copied["target_hidden_size"] = text["hidden_size"]
        copied["num_target_layers"] = int(text["num_hidden_layers"])
        copied["mask_token_id"] = _default_mask_token_id(text)
        merged = copied | cls._flatten(overrides)
        if aux_layer_ids is not None:
            merged["target_layer_ids"] = tuple(aux_layer_ids)
        elif "target_layer_ids" not in merged:
            merged["target_layer_ids"] = build_target_layer_ids(
                int(text["num_hidden_layers"]), int(merged.get("num_hidden_layers", 1))
            )
        return cls.from_dict(merged)

    @classmethod
    def _flatten(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Lift the ``dflash_config`` sub-dict into the top level."""
        data = dict(data)
        nested = data.pop("dflash_config", None) or {}
        return data | dict(nested)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DFlashConfig:
        """Read a config.json dict (reference layout with ``dflash_config``, or flat)."""
        data = cls._flatten(data)
        rope_parameters = data.pop("rope_parameters", None) or {}
        if "rope_theta" not in data and "rope_theta" in rope_parameters:
            data["rope_theta"] = rope_parameters["rope_theta"]
        rope_type = rope_parameters.get("rope_type", "default")
        if data.get("rope_scaling") is None and rope_type not in ("default", None):
            data["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        layer_types = data.get("layer_types")
        if layer_types is not None:
            sliding = [t == "sliding_attention" for t in layer_types]
            if any(sliding) and not all(sliding):
                raise ValueError("per-layer sliding windows are not supported: all or none")
            if not any(sliding):
                data["sliding_window"] = None
        elif data.get("use_sliding_window") is False:
            data["sliding_window"] = None
        for fixed in _FIXED_FIELDS:
            data.pop(fixed, None)
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"draft config is missing required fields: {missing}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        return cls(**kwargs, extra=data)

    def _nested(self) -> dict[str, Any]:
        return {
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
        }

    def to_dict(self) -> dict[str, Any]:
        """The config.json of an export (``architectures: [DFlashDraftModel]``, qwen3)."""
        out: dict[str, Any] = dict(self.extra)
        layer_type = "full_attention" if self.sliding_window is None else "sliding_attention"
        out.update(
            architectures=[ARCHITECTURE],
            model_type="qwen3",
            tie_word_embeddings=False,
            use_cache=True,
            use_sliding_window=self.sliding_window is not None,
            layer_types=[layer_type] * self.num_hidden_layers,
        )
        for f in fields(self):
            if f.name != "extra" and f.name not in self.nested_keys:
                out[f.name] = getattr(self, f.name)
        out["dflash_config"] = self._nested()
        scaling = dict(self.rope_scaling or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": rope_type} | scaling
        return out


class DFlashAttention(nn.Module):
    """Block queries attend to [context ; block] keys through the same k/v projections."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        H, d = config.hidden_size, int(config.head_dim or 0)
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d
        if self.n_heads % self.n_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.q_proj = nn.Linear(H, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, H, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """``x`` [B,Q,H] normed block states, ``context`` [B,C,H], ``mask`` [B,1,Q,C+Q] bool."""
        B, Q, _ = x.shape
        d = self.head_dim
        kv_in = torch.cat([context, x], dim=1)
        q = self.q_norm(self.q_proj(x).view(B, Q, self.n_heads, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(kv_in).view(B, -1, self.n_kv_heads, d)).transpose(1, 2)
        v = self.v_proj(kv_in).view(B, -1, self.n_kv_heads, d).transpose(1, 2)
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_kv)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.n_heads * d))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = GatedMLP(H, config.intermediate_size, config.hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope_kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        live: torch.Tensor,
    ) -> torch.Tensor:
        # The context enters k/v as projected: it is not passed through this layer's norm.
        attended = self.self_attn(self.input_layernorm(x), context, rope_q, rope_kv, mask)
        x = x + attended * live  # rows with nothing to attend to get no attention update
        return x + self.mlp(self.post_attention_layernorm(x))


@DRAFT_ARCHITECTURES.register("dflash")
class DFlashDraft(DraftModel):
    """DFlash draft; the target's embedding and lm_head are the caller's and never stored."""

    config_class = DFlashConfig

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(config.target_width, H, bias=False)
        self.hidden_norm = RMSNorm(H, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(H, config.rms_norm_eps)
        # Not a buffer: ``draft.to(bfloat16)`` must not round the rotary frequencies.
        self._inv_freq = rope_inverse_frequencies(
            int(config.head_dim or 0), config.rope_theta, config.rope_scaling
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.RNNBase):  # Domino's GRU keeps torch's own init
                module.reset_parameters()

    def save(self, directory: Any) -> None:
        """The SGLang-layout export (``config.json`` + ``model.safetensors``, no target tensors)."""
        from ..dflash.export import save_block_draft  # the dflash package imports this module

        save_block_draft(self, directory)

    def project_context(self, target_layers: torch.Tensor) -> torch.Tensor:
        """[B, C, n H_t] concatenated target layers -> context [B, C, H]."""
        return self.hidden_norm(self.fc(target_layers))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos/sin [B, T, d] at integer ``positions`` [B, T]."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return rope_cos_sin(positions, self._inv_freq, dtype)

    def forward(
        self,
        block_embeds: torch.Tensor,
        context: torch.Tensor,
        q_positions: torch.Tensor,
        ctx_positions: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Block hidden states [B, Q, H] after the final norm.

        ``attn_mask`` [B, Q, C+Q] bool, True = may attend; keys are ordered context then block.
        A query row with no allowed key attends nowhere (its attention update is zero).
        """
        x = block_embeds
        rope_q = self.rope(q_positions, x.dtype)
        rope_kv = self.rope(torch.cat([ctx_positions, q_positions], dim=1), x.dtype)
        live = attn_mask.any(dim=-1, keepdim=True)  # [B, Q, 1]
        mask = (attn_mask | ~live)[:, None]  # dead rows see everything: finite, then dropped
        live = live.to(x.dtype)
        for layer in self.layers:
            x = layer(x, context, rope_q, rope_kv, mask, live)
        return self.norm(x)
