"""Training-time-test attention with FlexAttention: masked key blocks are skipped, not computed.

At TTT step k the keys are ``[step 0 | step 1 | ... | step k]``, ``T`` each. A query at position
t sees the step-0 keys ``s <= t`` (causal) and, in every later step, only the key at t (the
diagonal). The SDPA path computes every score of the ``T x (k+1)T`` grid and masks most of them;
here the grid is cut into 128 x 128 blocks and only blocks holding an allowed key are computed:
the causal half of step 0 plus one diagonal block per later step and query block.

Two choices keep this cheap and cacheable (see docs/eagle3.md, "Attention pattern"):

* **T is padded to a multiple of the block**, so every step's keys start on a block boundary: a
  step's diagonal then touches exactly one key block per query block (unaligned it would straddle
  two), and the block mask depends only on the padded length and the step count, so one mask per
  ``(padded T, steps, device)`` is built and cached for the process. Padded queries are cut from
  the output; padded keys are never visible to a real query (causal: ``s <= t < T``; diagonal:
  the key at t itself).
* **Padding of the batch (``attention_mask``) is a ``score_mod``, not part of the block mask.** It
  differs every batch, so in the mask it would force a new block mask per batch. As a score
  modification (``-inf`` where the key is not a real token) it costs one lookup per computed
  score. It is applied to batches without padding too: one kernel variant, not two, so varying
  batches cost fewer recompilations.

On CUDA the kernel is ``torch.compile(flex_attention)``, compiled once per process; shapes that
change (T, the step count, the batch size) become dynamic after their first recompilation. Past
dynamo's recompile limit a compiled function silently falls back to the uncompiled flex, which
materialises every score (tens of GiB at T=4096), so the limit is raised and hitting it is an
error instead. PyTorch has no CPU backward for ``flex_attention``; on CPU this module calls the
flex operator's own dense implementation (what ``flex_attention`` runs uncompiled on every
device), which has a backward but materialises every score: a correctness path for tests, not a
fast one (``auto`` picks SDPA on CPU).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK_SIZE = 128  # FlexAttention's sparse block (query and key)


def padded_length(seq_len: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-seq_len // block_size) * block_size


def ttt_mask_mod(padded_len: int):
    """Element rule over ``[steps * padded_len]`` keys: step-0 causal, later steps diagonal."""

    def mask_mod(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx  # implies kv_idx < padded_len: step 0
        diagonal = (kv_idx >= padded_len) & (kv_idx % padded_len == q_idx)
        return causal | diagonal

    return mask_mod


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block map ``[n_q, n_kv]`` -> (blocks per row, their column indices first): the layout
    ``BlockMask.from_kv_blocks`` reads, with a batch and a head dimension of 1."""
    dense = dense.to(torch.int32)
    counts = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), indices[None, None].contiguous()


@functools.lru_cache(maxsize=64)
def ttt_block_mask(
    padded_len: int, steps: int, device: torch.device, block_size: int = BLOCK_SIZE
) -> BlockMask:
    """The block mask of ``ttt_mask_mod`` for ``steps`` steps, written down block by block.

    With ``padded_len`` a multiple of ``block_size`` the map is known without evaluating the
    rule element by element (``create_block_mask`` would materialise the whole
    ``padded_len x steps * padded_len`` grid, over a GiB of temporaries at T=4096, K=7): query
    block i sees key blocks ``j < i`` in full, and partially block i of every step (step 0's
    causal triangle, the later steps' diagonals). Broadcast over batch and heads."""
    if padded_len % block_size:
        raise ValueError(f"padded_len {padded_len} is not a multiple of {block_size}")
    n = padded_len // block_size
    q_block = torch.arange(n, device=device)[:, None]
    kv_block = torch.arange(steps * n, device=device)[None, :]
    full = kv_block < q_block
    partial = kv_block % n == q_block
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size,
        mask_mod=ttt_mask_mod(padded_len), seq_lengths=(padded_len, steps * padded_len),
    )  # fmt: skip


def key_padding_score_mod(real: torch.Tensor):
    """``-inf`` for keys that are padding: ``real`` is ``[B, padded_len]`` bool, and a key's
    position is its index modulo ``padded_len`` in every step."""
    padded_len = real.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(real[b, kv_idx % padded_len], score, -float("inf"))

    return score_mod


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, once per process (recompiled as shapes turn dynamic)."""
    return torch.compile(flex_attention)


# Each recompilation is one entry of dynamo's cache for the compiled function: a few per shape
# that turns dynamic. 32 leaves room; failing beats the silent dense fallback past the limit.
RECOMPILE_LIMIT = 32


def _flex(q, k, v, score_mod, block_mask: BlockMask, scale: float, compiled: bool):
    if compiled:
        from torch import _dynamo  # loaded on first use: its import takes about two seconds

        with _dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                  fail_on_recompile_limit_hit=True):  # fmt: skip
            return compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                             scale=scale, enable_gqa=True)  # fmt: skip
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    # The op traces its score_mod's backward when called. Under activation checkpointing that
    # trace's saved tensors would go through the checkpoint's hooks, which recompute the whole
    # layer inside the trace; so the op keeps its saved tensors (q, k, v, out, lse) plainly.
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        out, _, _ = flex_op(q, k, v, score_mod, block_mask.as_tuple(), scale, {})
    return out


def _keep(x):
    return x


def ttt_flex_attention(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    attention_mask: torch.Tensor,
    scale: float,
    *,
    compiled: bool | None = None,
) -> torch.Tensor:
    """TTT attention of ``q`` ``[B, h, T, d]`` over one ``[B, n_kv, T, d]`` key and value per
    step so far (GQA: ``h`` a multiple of ``n_kv``); ``attention_mask`` ``[B, T]``, 1 = real
    token. ``compiled``: the compiled kernel (default: on CUDA; on CPU PyTorch compiles only a
    forward, for inference)."""
    T = q.shape[2]
    pad = padded_length(T) - T
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        keys = [F.pad(k, (0, 0, 0, pad)) for k in keys]
        values = [F.pad(v, (0, 0, 0, pad)) for v in values]
    score_mod = key_padding_score_mod(F.pad(attention_mask.bool(), (0, pad)))
    block_mask = ttt_block_mask(T + pad, len(keys), q.device)
    if compiled is None:
        compiled = q.device.type == "cuda"
    out = _flex(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), score_mod, block_mask,
                scale, compiled)  # fmt: skip
    return out[:, :, :T] if pad else out
