"""The HF transformers target backend: CPU or CUDA, fp32 (CPU) or bf16 (CUDA).

How capture gets its features (measured, see ``bench/capture.py`` and the numbers below): the
CausalLM head is never run (for SmolLM2 at 8x512 tokens the full-vocab logits alone are 805 MB);
the base model (``model.model``) runs with ``use_cache=False`` and forward hooks on the 3 aux
decoder layers copy each layer's output into one preallocated ``[B, T, 3H]`` tensor, so no
layer output outlives the next layer. The base model's ``last_hidden_state`` is already after
``model.model.norm``. Outputs are created under ``torch.inference_mode()``: ``.clone()`` them
outside it before they enter an autograd graph (the feature store path copies anyway).

Measured by ``python -m bench capture`` on a SmolLM2-135M-shaped Llama (random init, 30 layers,
hidden 576, vocab 49152), batch 4 x 256 tokens, fp32, this project's 2-core CPU box (shared, so
+-8% noise on times). Time: median of 5 interleaved reps, 2 threads. Memory: peak RSS above the
loaded model during one forward, fresh subprocess per variant, returned features included:

    variant                                      time    peak memory
    bare model.model forward (no features)      1.90 s    +28.8 MB
    hooks (this module)                         1.87 s    +35.5 MB  (bare + the 6.75 MB output)
    output_hidden_states=True, then pick 3      2.08 s    +91.4 MB  (all 31 B x T x H states)
    output_hidden_states=[i+1, ...] (HF >= 5)      -      +35.4 MB
    CausalLM forward with full-vocab logits        -     +199.1 MB

Hooks cost nothing measurable over the bare forward (one [B, T, 3H] copy). Keeping every layer
grows with depth: for a Llama-3.1-8B at 8 x 4096 tokens bf16 it would hold 33 x 268 MB = 8.8 GB
instead of 0.8 GB. HF's own index selection matches hooks, but hooks do not depend on that
transformers-5 API and work on any model whose base exposes ``.layers``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..contracts import RunSpec
from ..models.skinny_linear import skinny_linears
from .decode_capture import Generated, generate_and_capture
from .engine import AuxLayerIds, CaptureOutput, TargetInfo, resolve_aux_layer_ids


def default_dtype(device: str | torch.device, accelerator_dtype: str = "bfloat16") -> torch.dtype:
    """fp32 on CPUs, whose bf16/fp16 matmuls are far slower; ``accelerator_dtype`` elsewhere."""
    on_cpu = torch.device(device).type == "cpu"
    return torch.float32 if on_cpu else getattr(torch, accelerator_dtype)


def _as_int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def target_info_from_config(config: Any, generation_config: Any = None) -> TargetInfo:
    """``TargetInfo`` from an HF config (the text config of a multimodal wrapper)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    eos: list[int] = []
    for source in (generation_config, text, config):
        for token in _as_int_tuple(getattr(source, "eos_token_id", None)):
            if token not in eos:
                eos.append(token)
    pad = getattr(text, "pad_token_id", None)
    if pad is None and generation_config is not None:
        pad = getattr(generation_config, "pad_token_id", None)
    tie = getattr(config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(text, "tie_word_embeddings", False)
    return TargetInfo(
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        model_type=str(text.model_type),
        tie_word_embeddings=bool(tie),
        eos_token_ids=tuple(eos),
        pad_token_id=None if pad is None else int(pad),
    )


class HFTargetEngine:
    """A frozen HF ``*ForCausalLM`` behind the ``TargetEngine`` protocol."""

    def __init__(
        self,
        model: nn.Module,
        *,
        model_dir: str | Path | None = None,
        aux_layer_ids: Sequence[int] | None = None,
        draft_config: dict[str, Any] | None = None,
        capture_method: str = "eagle3",
    ) -> None:
        from transformers import GenerationConfig

        self.model = model.eval().requires_grad_(False)
        if next(model.parameters()).device.type == "cpu":
            skinny_linears(self.model)  # decode and verification steps: see its module doc
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.info = target_info_from_config(model.config, getattr(model, "generation_config", None))
        self.capture_method = capture_method
        self.aux_layer_ids: AuxLayerIds = resolve_aux_layer_ids(
            aux_layer_ids, draft_config, self.info.num_layers, capture_method
        )
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = self.base.layers
        # A neutral generation config: a checkpoint's generation_config.json (top_k, repetition
        # penalty, sampling on by default ...) must not change what "the target's greedy output"
        # means. Every generate() call spells out its own settings.
        bos = getattr(self.model.generation_config, "bos_token_id", None)
        self.model.generation_config = GenerationConfig(
            bos_token_id=bos, pad_token_id=self._pad_id(), eos_token_id=None
        )
        self._tokenizer = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        aux_layer_ids: Sequence[int] | None = None,
        draft_config: dict[str, Any] | None = None,
        capture_method: str = "eagle3",
    ) -> HFTargetEngine:
        """Load a local HF checkpoint directory (no network) onto ``device`` in ``dtype``."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.to(torch.device(device))
        return cls(model, model_dir=model_dir, aux_layer_ids=aux_layer_ids,
                   draft_config=draft_config, capture_method=capture_method)  # fmt: skip

    @classmethod
    def for_run(
        cls, spec: RunSpec, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> HFTargetEngine:
        """The run's target with the layers its capture method takes, in ``dtype`` or
        ``default_dtype``."""
        dtype = dtype or default_dtype(device, spec.target.dtype)
        return cls.from_pretrained(spec.target.path, device=device, dtype=dtype,
                                   aux_layer_ids=spec.draft.aux_layer_ids,
                                   draft_config=spec.draft.config,
                                   capture_method=spec.capture_method)  # fmt: skip

    @property
    def tokenizer(self):
        """The tokenizer saved next to the weights (loaded on first use)."""
        if self._tokenizer is None:
            if self.model_dir is None:
                raise ValueError("this engine was built from a model object; no tokenizer dir")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return self._pad_id()

    def _pad_id(self) -> int:
        if self.info.pad_token_id is not None:
            return self.info.pad_token_id
        return self.info.eos_token_ids[0] if self.info.eos_token_ids else 0

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        ids = input_ids.to(self.device, torch.long)
        if attention_mask is None:
            return ids, torch.ones_like(ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(ids.shape)}"
            )
        return ids, attention_mask.to(self.device, torch.long)

    @torch.inference_mode()
    def capture(self, input_ids: Tensor, attention_mask: Tensor) -> CaptureOutput:
        """Aux layer outputs and the post-norm final hidden state; no logits, no KV cache."""
        ids, mask = self._inputs(input_ids, attention_mask)
        with self.aux_outputs(ids.shape) as aux:
            out = self.base(input_ids=ids, attention_mask=mask, use_cache=False)
        self.fill_final(aux, out.last_hidden_state)
        return CaptureOutput(aux_hidden_states=aux, hidden_states=out.last_hidden_state)

    def generate_and_capture(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        temperature: float = 0.0,
        seeds: Sequence[int | None] | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[Generated]:
        """Replies to token-id prompts with the features of prompt + reply (``decode_capture``)."""
        return generate_and_capture(self, prompts, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seeds=seeds,
                                    stop_token_ids=stop_token_ids)  # fmt: skip

    @contextmanager
    def aux_outputs(self, shape: torch.Size | tuple[int, int]) -> Iterator[Tensor]:
        """A ``[B, T, nH]`` buffer that the captured layers' outputs fill during the forward.

        HF's hidden_states[N] is the post-norm state, not the last layer's raw output; an
        explicit aux id N-1 therefore means the final (post-norm) hidden state, which
        ``fill_final`` copies in after the forward."""
        batch, length = shape
        hidden = self.info.hidden_size
        width = len(self.aux_layer_ids) * hidden
        aux = torch.empty(batch, length, width, device=self.device, dtype=self.dtype)

        def grab(slot: int):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                state = output[0] if isinstance(output, (tuple, list)) else output
                aux[..., slot * hidden : (slot + 1) * hidden].copy_(state)

            return hook

        last = self.info.num_layers - 1
        handles = [
            self.layers[layer].register_forward_hook(grab(slot))
            for slot, layer in enumerate(self.aux_layer_ids)
            if layer != last
        ]
        try:
            yield aux
        finally:
            for handle in handles:
                handle.remove()

    def fill_final(self, aux: Tensor, final: Tensor) -> None:
        """Copy the final hidden state into the slot of an aux id N-1 (see ``aux_outputs``)."""
        hidden = self.info.hidden_size
        for slot, layer in enumerate(self.aux_layer_ids):
            if layer == self.info.num_layers - 1:
                aux[..., slot * hidden : (slot + 1) * hidden].copy_(final)

    @torch.inference_mode()
    def forward_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full-vocab logits ``[B, T, V]`` of the CausalLM (checks, teachers)."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """New tokens per row: greedy at temperature 0, else plain temperature sampling.

        Rows may be right- or left-padded (the mask tells real tokens); they are re-packed to the
        left padding HF generation needs. ``stop_token_ids`` defaults to the target's EOS ids,
        ``[]`` disables stopping; each row is cut after its first stop token (kept). A ``seed``
        makes sampling reproducible without touching the caller's global RNG.
        """
        from transformers import GenerationConfig

        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        ids, mask = self._inputs(input_ids, attention_mask)
        pad = self._pad_id()
        rows = [row[m.bool()] for row, m in zip(ids, mask, strict=True)]
        if any(len(row) == 0 for row in rows):
            raise ValueError("every row needs at least one prompt token (mask all zero)")
        width = max(len(r) for r in rows)
        packed = torch.full((len(rows), width), pad, dtype=torch.long, device=self.device)
        packed_mask = torch.zeros_like(packed)
        for i, row in enumerate(rows):
            packed[i, width - len(row) :] = row
            packed_mask[i, width - len(row) :] = 1

        stops = list(self.info.eos_token_ids if stop_token_ids is None else stop_token_ids)
        sampling = temperature > 0
        settings: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": sampling,
            "num_beams": 1,
            "eos_token_id": stops or None,
            "pad_token_id": pad,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
        }
        if sampling:
            settings |= {"temperature": float(temperature), "top_k": 0, "top_p": 1.0}
        config = GenerationConfig(**settings)

        def run() -> Tensor:
            return self.model.generate(
                input_ids=packed, attention_mask=packed_mask, generation_config=config
            )

        if sampling and seed is not None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = run()
        else:
            out = run()

        stop_set = set(stops)
        result: list[list[int]] = []
        for row in out[:, width:].tolist():
            for i, token in enumerate(row):
                if token in stop_set:
                    row = row[: i + 1]
                    break
            result.append(row)
        return result
