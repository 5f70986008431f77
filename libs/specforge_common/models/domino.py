"""The Domino draft: the DFlash backbone plus a causal logits correction inside each block.

The backbone drafts every block position in parallel, blind to what it drafts before them. Domino
adds that dependency cheaply: a GRU reads the (target) embeddings of the block's tokens so far and
a small MLP turns [backbone hidden ; GRU state] into a vocabulary-sized correction added to the
base logits. Parameter names are the reference layout (``prefix_gru``, ``embed_proj``).

Indexing by *drafted position* ``j`` (``D`` per block; the label of ``j`` is token
``anchor + j + 1``: block position ``j + 1`` without ``shift_label``, ``j`` with it):

    prev embeds [N,D,H]   target embeddings of tokens anchor .. anchor+D-1 (teacher forced)
    states      [N,D,G] = prefix_gru(prev embeds)      state j has read anchor .. anchor+j
    base        [N,D,V] = hidden @ target_head.T
    final[:, j]         = base[:, j]                                      j <  pure_draft_prefix_len
                        = base[:, j] + embed_proj([hidden_j ; state_j])   j >= pure_draft_prefix_len
    embed_proj = Linear(H+G -> correction_dim) -> SiLU -> Linear(correction_dim -> V), no biases
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import DRAFT_ARCHITECTURES
from .dflash import DFlashConfig, DFlashDraft, read_out
from .layers import upcast


@dataclass
class DominoConfig(DFlashConfig):
    gru_hidden_dim: int = 1024
    correction_dim: int = 256  # the reference's ``emb_dim``
    pure_draft_prefix_len: int = 1  # leading drafted positions that keep the base logits
    shift_label: bool = False  # block position k predicts anchor+k+1 (else anchor+k, k >= 1)
    # Training knobs: lambda decays linearly from start to 0 over total_steps * decay_ratio.
    lambda_base_start: float = 1.0
    lambda_base_decay_ratio: float = 1.0

    nested_keys: ClassVar[tuple[str, ...]] = DFlashConfig.nested_keys + (
        "gru_hidden_dim", "correction_dim", "pure_draft_prefix_len", "shift_label",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.pure_draft_prefix_len < self.num_drafted:
            raise ValueError(
                f"pure_draft_prefix_len {self.pure_draft_prefix_len} leaves no corrected slots "
                f"in a block of {self.num_drafted} drafted positions"
            )

    @property
    def num_drafted(self) -> int:
        """Predicted positions per block."""
        return self.block_size if self.shift_label else self.block_size - 1

    @classmethod
    def _flatten(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = super()._flatten(data)
        projector = data.pop("projector_type", "domino")
        if projector != "domino":
            raise ValueError(f"a Domino draft has projector_type 'domino', not {projector!r}")
        if "emb_dim" in data:
            emb_dim = data.pop("emb_dim")
            data.setdefault("correction_dim", emb_dim)
        return data

    def _nested(self) -> dict[str, Any]:
        return super()._nested() | {
            "projector_type": "domino",
            "gru_hidden_dim": self.gru_hidden_dim,
            "emb_dim": self.correction_dim,
            "pure_draft_prefix_len": self.pure_draft_prefix_len,
            "shift_label": self.shift_label,
        }


@DRAFT_ARCHITECTURES.register("domino")
class DominoDraft(DFlashDraft):
    config_class = DominoConfig
    config: DominoConfig

    def __init__(self, config: DominoConfig) -> None:
        super().__init__(config)
        H, G = config.hidden_size, config.gru_hidden_dim
        self.prefix_gru = nn.GRU(H, G, num_layers=1, batch_first=True, bias=False)
        self.embed_proj = nn.Sequential(
            nn.Linear(H + G, config.correction_dim, bias=False),
            nn.SiLU(),
            nn.Linear(config.correction_dim, config.vocab_size, bias=False),
        )
        self.reset_parameters()

    def prefix_states(self, prev_embeds: torch.Tensor) -> torch.Tensor:
        """Teacher-forced GRU states [..., D, G] from prev embeds [..., D, H]."""
        lead, (D, H) = prev_embeds.shape[:-2], prev_embeds.shape[-2:]
        dtype = self.prefix_gru.weight_ih_l0.dtype
        states, _ = self.prefix_gru(prev_embeds.reshape(-1, D, H).to(dtype))
        return states.reshape(*lead, D, -1)

    def corrected_logits(
        self, hidden: torch.Tensor, states: torch.Tensor, target_head: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, final) logits [..., D, V] (fp32 or wider) from hidden [..., D, H] and GRU
        states [..., D, G]."""
        base = read_out(hidden, target_head)
        p = self.config.pure_draft_prefix_len
        features = torch.cat([hidden[..., p:, :], states[..., p:, :].to(hidden.dtype)], dim=-1)
        suffix = base[..., p:, :] + upcast(self.embed_proj(features)).to(base.dtype)
        return base, torch.cat([base[..., :p, :], suffix], dim=-2)

    def block_logits(
        self, hidden: torch.Tensor, prev_embeds: torch.Tensor, target_head: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (base, final) logits [..., D, V] with the GRU teacher forced."""
        return self.corrected_logits(hidden, self.prefix_states(prev_embeds), target_head)

    def decode_step(
        self,
        hidden: torch.Tensor,
        prev_embed: torch.Tensor,
        state: torch.Tensor | None,
        index: int,
        target_head: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoding, one drafted position ``index`` at a time: hidden [N, H] of that position,
        prev_embed [N, H] of the token before its label (the anchor token for index 0, then the
        token just drafted), ``state`` [N, G] from the previous step (None at index 0).
        Returns (base [N, V], final [N, V], new state)."""
        dtype = self.prefix_gru.weight_ih_l0.dtype
        h0 = None if state is None else state[None].to(dtype)
        _, h = self.prefix_gru(prev_embed[:, None].to(dtype), h0)
        state = h[0]
        base = read_out(hidden, target_head)
        if index < self.config.pure_draft_prefix_len:
            return base, base, state
        features = torch.cat([hidden, state.to(hidden.dtype)], dim=-1)
        return base, base + upcast(self.embed_proj(features)).to(base.dtype), state
