"""The target decoding one sequence with its KV cache, for the evaluator's decoding loops.

A forward appends tokens to the cache and ``crop`` drops the trailing ones a verification
rejected, so the prefix is never computed twice. With ``with_aux`` each forward also returns the
aux hidden states of its positions: what the draft reads in the next round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from specforge_common.targets.hf import HFTargetEngine

__all__ = ["TargetSession"]


class TargetSession:
    """An HF CausalLM decoding one sequence with a ``DynamicCache``; optionally captures the
    engine's layers (EAGLE-3's aux layers, DFlash's target layers) with hooks, as
    ``HFTargetEngine.capture`` does (id N-1 = post-norm final state)."""

    def __init__(self, engine: HFTargetEngine, *, with_aux: bool) -> None:
        from transformers import DynamicCache

        self.engine = engine
        self.model = engine.model
        self.cache = DynamicCache(config=self.model.config)
        self.with_aux = with_aux
        self._aux: list[Tensor | None] = [None] * len(engine.aux_layer_ids)
        self._handles: list[Any] = []

    def __enter__(self) -> TargetSession:
        if self.with_aux:
            last = self.engine.info.num_layers - 1
            for slot, layer in enumerate(self.engine.aux_layer_ids):
                module = self.engine.base if layer == last else self.engine.layers[layer]
                self._handles.append(module.register_forward_hook(self._grab(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _grab(self, slot: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            state = getattr(output, "last_hidden_state", None)
            if state is None:
                state = output[0] if isinstance(output, (tuple, list)) else output
            self._aux[slot] = state

        return hook

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward(self, ids: Tensor, *, logits_to_keep: int = 0) -> tuple[Tensor, Tensor | None]:
        """Append ``ids`` ``[n]``: fp32 logits ``[n or logits_to_keep, V]`` and the captured
        layers ``[n, len(aux_layer_ids) H]``."""
        out = self.model(
            input_ids=ids.to(self.engine.device)[None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        aux = None
        if self.with_aux:
            aux = torch.cat([a[0] for a in self._aux if a is not None], dim=-1)
            self._aux = [None] * len(self._aux)
        return out.logits[0].float(), aux

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            self.cache.crop(-tokens_to_remove)
