"""An EAGLE-3 draft that decodes incrementally: step-0 keys/values are kept per accepted position.

Training runs the whole training-time-test (TTT) unroll over a sequence at once (``TTTCache``).
Serving needs the same numbers one round at a time:

* **step 0** at position ``s`` takes ``h_0 = fc(aux_s)`` and the embedding of token ``s+1`` at
  position id ``s``. Its key/value never change once ``s`` and ``s+1`` are accepted, so they are
  computed once (``extend``) and kept in ``DraftKVCache``.
* **chain step j** (``j >= 1``) at the last accepted position ``t`` takes step ``j-1``'s raw
  output hidden and the previously drafted token, at position id ``t+j``. Its query sees the
  step-0 keys of all positions ``<= t`` plus the chain keys at ``t`` of steps ``1..j`` (the TTT
  diagonal). Chain keys belong to one drafting round and are dropped by ``clear_chain``.

The draft's own modules do all the math: ``Eagle3Draft.step`` is called with a ``_StepKV`` view
in place of a ``TTTCache``. The view gives ``Eagle3Attention`` what it reads from a cache
(``backend``, the ``keys``/``values`` lists it appends to, ``sdpa_mask()``) with the keys laid out
as ``[step-0 keys of positions 0..n-1 | this call's own keys]``, so the SDPA path of
``models/eagle3.py`` computes exactly the TTT attention restricted to the new queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from specforge_common.models.eagle3 import Eagle3Draft
from specforge_common.models.skinny_linear import skinny_linears

__all__ = ["DraftKVCache", "IncrementalDraft"]


@dataclass
class DraftKVCache:
    """Rotated step-0 keys and values of every accepted position, ``[1, n_kv, n, d]``."""

    keys: Tensor | None = None
    values: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: Tensor, values: Tensor) -> None:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)


@dataclass
class _StepKV:
    """What ``Eagle3Attention`` sees for one ``Eagle3Draft.step`` call (duck-types ``TTTCache``).

    ``keys``/``values`` start as the past keys the new queries may all see; the attention appends
    this call's own keys. ``causal`` says whether the new queries see each other causally (step 0
    over several new positions) or only themselves (one chain query: no mask needed).
    """

    keys: list[Tensor]
    values: list[Tensor]
    causal: bool
    backend: str = field(default="sdpa", init=False)

    def sdpa_mask(self) -> Tensor | None:
        new = self.keys[-1].shape[2]
        if not self.causal or new == 1:
            return None  # every query sees every key
        past = sum(k.shape[2] for k in self.keys[:-1])
        device = self.keys[-1].device
        mask = torch.ones(new, past + new, dtype=torch.bool, device=device)
        mask[:, past:] = torch.ones(new, new, dtype=torch.bool, device=device).tril()
        return mask[None, None]


class IncrementalDraft:
    """An ``Eagle3Draft`` decoding one request (batch size 1) round by round.

    ``extend`` adds accepted positions (their step-0 keys stay cached), ``chain_step`` runs one
    chain step at the last accepted position, ``clear_chain`` ends the round. Call under
    ``torch.inference_mode()`` (or ``no_grad``).
    """

    def __init__(self, draft: Eagle3Draft) -> None:
        if draft.fc.weight.device.type == "cpu":
            skinny_linears(draft)  # a few rows per step: see models/skinny_linear.py
        self.draft = draft
        self.cache = DraftKVCache()
        self._chain_keys: list[Tensor] = []
        self._chain_values: list[Tensor] = []
        param = draft.fc.weight
        self.device, self.dtype = param.device, param.dtype

    @property
    def length(self) -> int:
        """Accepted positions whose step-0 key/value is cached."""
        return self.cache.length

    def reset(self) -> None:
        self.cache = DraftKVCache()
        self.clear_chain()

    def clear_chain(self) -> None:
        self._chain_keys, self._chain_values = [], []

    def _past(self) -> tuple[list[Tensor], list[Tensor]]:
        if self.cache.keys is None or self.cache.values is None:
            return [], []
        return [self.cache.keys], [self.cache.values]

    def extend(self, aux_hidden_states: Tensor, next_tokens: Tensor) -> Tensor:
        """Step 0 at ``m`` new positions ``n..n+m-1``: ``aux`` ``[m, 3H_t]`` are their target aux
        states, ``next_tokens`` ``[m]`` the tokens at ``n+1..n+m``. Returns their raw step-0
        output hiddens ``[m, H]``; the last row is what the next drafting round starts from."""
        if self._chain_keys:
            raise RuntimeError("extend() during a drafting round: call clear_chain() first")
        m = aux_hidden_states.shape[0]
        if next_tokens.shape != (m,):
            raise ValueError(f"next_tokens must be [{m}], got {tuple(next_tokens.shape)}")
        start = self.length
        h0 = self.draft.project_aux(aux_hidden_states.to(self.device, self.dtype)[None])
        positions = torch.arange(start, start + m, device=self.device)[None]
        keys, values = self._past()
        view = _StepKV(keys, values, causal=True)
        hidden = self.draft.step(next_tokens.to(self.device)[None], h0, positions, view)
        self.cache.append(view.keys[-1], view.values[-1])
        return hidden[0]

    def chain_step(self, token: int | Tensor, hidden: Tensor, j: int) -> Tensor:
        """Chain step ``j >= 1`` at the last accepted position ``t``: input ``token`` (the token
        drafted by step ``j-1``) and ``hidden`` ``[H]`` (step ``j-1``'s raw output), position id
        ``t+j``. Returns the step's raw output hidden ``[H]``."""
        if j != len(self._chain_keys) + 1:
            raise ValueError(f"chain step {j} after {len(self._chain_keys)} chain steps")
        if self.length == 0:
            raise RuntimeError("chain_step() before any extend()")
        t = self.length - 1
        ids = torch.as_tensor(token, device=self.device).reshape(1, 1)
        positions = torch.full((1, 1), t + j, device=self.device)
        keys, values = self._past()
        view = _StepKV(keys + self._chain_keys, values + self._chain_values, causal=False)
        out = self.draft.step(ids, hidden.reshape(1, 1, -1), positions, view)
        self._chain_keys.append(view.keys[-1])
        self._chain_values.append(view.values[-1])
        return out[0, 0]
