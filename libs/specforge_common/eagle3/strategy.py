"""The EAGLE-3 training strategy: training-time test (TTT) unroll and its loss and metrics.

Step k feeds the draft its own step-(k-1) hidden state (feature drift is trained, not teacher
forced), consumes token ``t+1+k`` at position t and is supervised by the target distribution at
``t+1+k``. The loss is ``sum_k decay^k * ploss_k`` with ``ploss_k`` the soft cross entropy
against the draft-vocab teacher, averaged over all B*T positions (masked ones count as 0).

How a step is computed, none of which changes what it computes (docs/eagle3.md, "Memory of a
train step"): ``attention`` (the TTT attention kernel), ``loss_chunk_tokens`` (the soft cross
entropy and the metrics a chunk of tokens at a time), ``activation_checkpointing`` (the decoder
layer recomputed in backward) and ``precision`` (bf16 autocast on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..batch import TrainBatch
from ..models.eagle3 import AttentionChoice, Eagle3Draft, TTTCache, resolve_attention
from ..models.layers import upcast
from ..precision import Precision, autocast, resolve_precision
from ..registry import STRATEGIES
from ..strategy import StrategyOutput
from .soft_cross_entropy import DEFAULT_CHUNK_TOKENS, soft_cross_entropy, token_chunks
from .teacher import prepare_teacher, shift_left

if TYPE_CHECKING:
    from ..contracts import RunSpec

__all__ = ["Eagle3Metrics", "Eagle3Strategy", "StrategyOutput"]


@dataclass
class Eagle3Metrics:
    """Raw per-step sums (float64) so batches and ranks add up before any ratio is taken."""

    ploss: torch.Tensor  # [K] sum over batches of ploss_k * (B*T)
    correct: torch.Tensor  # [K] correct draft argmax at loss-masked positions
    denom: torch.Tensor  # [K] loss-masked positions (the acc_k denominator)
    accept: torch.Tensor  # [K] sum of expected acceptance a_k at position-masked positions
    accept_denom: torch.Tensor  # [K] position-masked positions (the acceptance_rate_k denominator)
    positions: torch.Tensor  # scalar: B*T summed over batches (the ploss denominator)
    step_weight_decay: float = 0.8

    @classmethod
    def zeros(cls, ttt_length: int, step_weight_decay: float = 0.8) -> Eagle3Metrics:
        z = torch.zeros(ttt_length, dtype=torch.float64)
        return cls(z, z.clone(), z.clone(), z.clone(), z.clone(),
                   torch.zeros((), dtype=torch.float64), step_weight_decay)  # fmt: skip

    def __add__(self, other: Eagle3Metrics) -> Eagle3Metrics:
        return Eagle3Metrics(
            self.ploss + other.ploss, self.correct + other.correct, self.denom + other.denom,
            self.accept + other.accept, self.accept_denom + other.accept_denom,
            self.positions + other.positions, self.step_weight_decay,
        )  # fmt: skip

    def tensors(self) -> list[torch.Tensor]:
        """The sums, for an all-reduce across ranks, in field order (``from_tensors``)."""
        return [self.ploss, self.correct, self.denom, self.accept, self.accept_denom,
                self.positions]  # fmt: skip

    def from_tensors(self, tensors: list[torch.Tensor]) -> Eagle3Metrics:
        return Eagle3Metrics(*tensors, step_weight_decay=self.step_weight_decay)

    def zero(self) -> Eagle3Metrics:
        return Eagle3Metrics.zeros(self.ploss.numel(), self.step_weight_decay)

    def supervised_positions(self) -> float:
        """Loss-masked positions of the first TTT step."""
        return float(self.denom[0]) if self.denom.numel() else 0.0

    def accuracies(self) -> list[float]:
        return (self.correct / self.denom.clamp(min=1)).tolist()

    def simulated_acceptance_length(self) -> float:
        """``sum_k prod_{i<=k} acc_i`` — no bonus token (the training-time convention)."""
        total, running = 0.0, 1.0
        for acc in self.accuracies():
            running *= acc
            total += running
        return total

    def summary(self) -> dict[str, float]:
        K = self.ploss.numel()
        ploss = (self.ploss / self.positions.clamp(min=1)).tolist()
        # acc_k is over the loss mask, acceptance_rate_k over the position mask (the reference's
        # conventions): a target token outside the draft vocab is a miss for acc_k but is left
        # out of acceptance_rate_k.
        accept = (self.accept / self.accept_denom.clamp(min=1)).tolist()
        out: dict[str, float] = {}
        for k, (p, a, r) in enumerate(zip(ploss, self.accuracies(), accept, strict=True)):
            out[f"ploss_{k}"], out[f"acc_{k}"], out[f"acceptance_rate_{k}"] = p, a, r
        out["loss"] = sum(self.step_weight_decay**k * p for k, p in enumerate(ploss))
        out["acc"] = float(self.correct.sum() / self.denom.sum().clamp(min=1))
        out["acceptance_rate"] = sum(accept) / K
        out["simulated_acc_len"] = self.simulated_acceptance_length()
        return out


@STRATEGIES.register("eagle3")
class Eagle3Strategy:
    """Loss and telemetry of one batch; the trainer owns optimizer, accumulation and ranks."""

    capture_method: ClassVar[str] = "eagle3"
    weighted_loss: ClassVar[bool] = False

    def __init__(
        self,
        draft: Eagle3Draft,
        target_head: torch.Tensor,
        *,
        ttt_length: int = 7,
        step_weight_decay: float = 0.8,
        attention: AttentionChoice = "auto",
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        activation_checkpointing: bool = False,
        precision: Precision = "fp32",
    ) -> None:
        """``attention`` and ``precision`` are resolved against the draft's device here (``auto``:
        flex and bf16 on CUDA, sdpa and fp32 elsewhere). ``precision`` defaults to fp32, the
        numerics a bare strategy (the evaluator's) has always had; the trainer passes the run's
        ``train.precision``, whose default is ``auto``."""
        if target_head.shape[0] != draft.config.vocab_size:
            raise ValueError(
                f"target head has {target_head.shape[0]} rows but the draft's target vocabulary "
                f"is {draft.config.vocab_size}"
            )
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0 (0: one chunk): {loss_chunk_tokens}")
        device = draft.fc.weight.device
        self.draft = draft
        self.target_head = target_head.detach().requires_grad_(False)
        self.ttt_length = ttt_length
        self.step_weight_decay = step_weight_decay
        self.attention = resolve_attention(attention, device)
        self.loss_chunk_tokens = loss_chunk_tokens
        self.activation_checkpointing = activation_checkpointing
        self.precision = resolve_precision(precision, device)

    @classmethod
    def from_spec(
        cls,
        spec: RunSpec,
        draft: Eagle3Draft,
        *,
        target_head: torch.Tensor,
        target_embedding: torch.Tensor,
        total_steps: int | None,
    ) -> Eagle3Strategy:
        del target_embedding, total_steps  # the draft holds its copy of the embedding
        train = spec.train
        return cls(draft, target_head, ttt_length=train.ttt_length, attention=train.attention,
                   loss_chunk_tokens=train.loss_chunk_tokens,
                   activation_checkpointing=train.activation_checkpointing,
                   precision=train.precision)  # fmt: skip

    def set_step(self, step: int) -> None:
        """EAGLE-3's loss has no schedule."""

    def empty_metrics(self) -> Eagle3Metrics:
        return Eagle3Metrics.zeros(self.ttt_length, self.step_weight_decay)

    def __call__(self, batch: TrainBatch) -> StrategyOutput:
        with autocast(self.precision):
            return self._unroll(batch)

    def _unroll(self, batch: TrainBatch) -> StrategyOutput:
        draft, K = self.draft, self.ttt_length
        bf16 = self.precision == "bf16"
        teacher = prepare_teacher(batch, self.target_head, draft.t2d, K,
                                  probs_dtype=torch.bfloat16 if bf16 else None)  # fmt: skip
        B, T = batch.input_ids.shape
        dtype = draft.fc.weight.dtype

        hidden = draft.project_aux(batch.aux_hidden_states.to(dtype))
        cache = TTTCache(batch.attention_mask, backend=self.attention)
        positions = torch.arange(T, device=hidden.device).expand(B, T)
        ids, position_mask, loss_mask = teacher.input_ids, teacher.position_mask, teacher.loss_mask

        loss = hidden.new_zeros((), dtype=upcast(hidden).dtype)
        metrics = Eagle3Metrics.zeros(K, self.step_weight_decay)
        for k in range(K):
            hidden = draft.step(ids, hidden, positions + k, cache,
                                recompute=self.activation_checkpointing)  # fmt: skip
            logits = draft.compute_logits(hidden)  # [B, T, V_d]
            rows = slice(k, k + T)  # the step's teacher rows
            ce = soft_cross_entropy(logits, teacher.target_p[:, rows], position_mask,
                                    self.loss_chunk_tokens)  # fmt: skip
            ploss = ce / (B * T)
            loss = loss + self.step_weight_decay**k * ploss
            hits, accept = self._step_counts(
                logits.detach(), teacher.target_ids[:, rows], teacher.p_on_draft[:, rows],
                position_mask,
            )  # fmt: skip
            metrics.ploss[k] = ploss.detach().double() * (B * T)
            metrics.correct[k] = (hits * loss_mask).sum().double()
            metrics.denom[k] = loss_mask.sum().double()
            metrics.accept[k] = accept
            metrics.accept_denom[k] = position_mask.sum().double()
            if k < K - 1:
                ids, position_mask = shift_left(ids), shift_left(position_mask)
                loss_mask = shift_left(loss_mask)
        metrics.positions += B * T
        return StrategyOutput(loss, metrics)

    @torch.no_grad()
    def _step_counts(
        self,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        p_on_draft: torch.Tensor,
        position_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's argmax hits ``[B, T]`` (draft argmax mapped to a target id == the target's
        argmax) and its expected acceptance summed over the position mask, a chunk of tokens at
        a time like the loss (``target_ids``, ``p_on_draft``: the step's teacher rows)."""
        B, T = logits.shape[:2]
        hits = torch.empty(B, T, dtype=position_mask.dtype, device=logits.device)
        accept = torch.zeros((), dtype=torch.float64, device=logits.device)
        for rows in token_chunks(B, T, self.loss_chunk_tokens):
            chunk = logits[rows]
            predicted = self.draft.draft_to_target(chunk.argmax(dim=-1))
            hits[rows] = (predicted == target_ids[rows]).to(hits.dtype)
            q = torch.softmax(upcast(chunk), dim=-1)
            overlap = torch.minimum(upcast(p_on_draft[rows]), q).sum(-1)
            accept += (overlap * position_mask[rows]).sum().double()
        return hits, accept
