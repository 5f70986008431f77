"""The FlexAttention TTT path against the plain reference path: values and q/k/v gradients.

On CPU PyTorch runs flex's dense implementation (every score, the mask_mod and score_mod applied
elementwise) with a backward, and a compiled forward that reads the block mask; on CUDA the
compiled kernel does both. The block mask itself is checked against ``create_block_mask``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from specforge_common.models.eagle3 import (
    TTTCache,
    resolve_attention,
    ttt_attention_flex,
    ttt_attention_reference,
)
from specforge_common.models.ttt_flex import (
    padded_length,
    ttt_block_mask,
    ttt_flex_attention,
    ttt_mask_mod,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8  # GQA: two query heads per key/value head

# (name, per-row real lengths, T): a full batch, right padding of different lengths (zeros at the
# end of the attention mask), and a T spanning several 128-blocks that is not a multiple of one.
PADDING_CASES = [
    ("no-padding", (13, 13), 13),
    ("right-padded", (13, 9, 4), 13),
    ("multi-block", (300, 201), 300),
]


def make_inputs(lengths: tuple[int, ...], T: int, steps: int, dtype=torch.float32, seed=0):
    """Leaf q, per-step keys and values (GQA), and the attention mask of ``lengths``."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)

    q = leaf(B, HEADS, T, HEAD_DIM)
    keys = [leaf(B, KV_HEADS, T, HEAD_DIM) for _ in range(steps)]
    values = [leaf(B, KV_HEADS, T, HEAD_DIM) for _ in range(steps)]
    weights = torch.randn(B, HEADS, T, HEAD_DIM, generator=gen, dtype=dtype)
    return q, keys, values, mask, weights


@torch.no_grad()
def output(attend, q, keys, values, mask):
    return attend(q, TTTCache(mask, keys=list(keys), values=list(values)), HEAD_DIM**-0.5)


def output_and_grads(attend, q, keys, values, mask, weights):
    cache = TTTCache(mask, keys=list(keys), values=list(values))
    out = attend(q, cache, HEAD_DIM**-0.5)
    grads = torch.autograd.grad((out * weights).sum(), [q, *keys, *values])
    return out.detach(), grads


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize(("name", "lengths", "T"), PADDING_CASES, ids=[c[0] for c in PADDING_CASES])
def test_flex_equals_the_reference_in_value_and_q_k_v_gradients(
    name: str, lengths: tuple[int, ...], T: int, steps: int
) -> None:
    inputs = make_inputs(lengths, T, steps)
    out, grads = output_and_grads(ttt_attention_flex, *inputs)
    ref_out, ref_grads = output_and_grads(ttt_attention_reference, *inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
    # The comparison can fail: without the padding, padded positions would see padded keys.
    if name == "right-padded":
        q, keys, values, mask, weights = inputs
        unpadded = output(ttt_attention_flex, q, keys, values, torch.ones_like(mask))
        assert not torch.allclose(unpadded[1], out[1])


def test_a_padded_key_of_a_later_step_is_not_seen_and_a_real_one_is() -> None:
    """The diagonal: step-2 keys matter only at their own position, and not at padding."""
    q, keys, values, mask, _ = make_inputs((13, 9), 13, 3)
    base = output(ttt_attention_flex, q, keys, values, mask)
    for t, row, visible in ((4, 0, True), (10, 1, False)):
        moved = [k.detach().clone() for k in keys]
        moved[2][row, :, t] += 5.0
        out = output(ttt_attention_flex, q, moved, values, mask)
        changed = (out - base).abs().amax(dim=(1, 3)) > 0  # [B, T]
        expected = torch.zeros_like(changed)
        expected[row, t] = visible
        assert torch.equal(changed, expected), (t, row)


BLOCK_MASK_CASES = [(128, 1, 128), (256, 3, 128), (384, 7, 128), (96, 4, 16)]


@pytest.mark.parametrize(("padded_len", "steps", "block"), BLOCK_MASK_CASES)
def test_block_mask_is_the_one_create_block_mask_derives_from_the_rule(
    padded_len: int, steps: int, block: int
) -> None:
    ours = ttt_block_mask(padded_len, steps, torch.device("cpu"), block)
    theirs = create_block_mask(ttt_mask_mod(padded_len), None, None, padded_len,
                               steps * padded_len, device="cpu", BLOCK_SIZE=block)  # fmt: skip
    assert ours.shape == theirs.shape and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    for count, field in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks",
                         "full_kv_indices"), ("q_num_blocks", "q_indices")):  # fmt: skip
        n = getattr(ours, count)[0, 0]
        a, b = getattr(ours, field)[0, 0], getattr(theirs, field)[0, 0]
        for row, k in enumerate(n.tolist()):
            assert sorted(a[row, :k].tolist()) == sorted(b[row, :k].tolist()), (field, row)


def test_the_block_mask_skips_what_the_rule_masks() -> None:
    """At T=4096 and 7 steps: 16.5 of 32 step-0 blocks and 6 diagonal blocks per query block
    are computed, 22.5 of 224 (10%) — what docs/eagle3.md quotes."""
    bm = ttt_block_mask(4096, 7, torch.device("cpu"))
    computed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert computed == 32 * 33 // 2 + 32 * 6
    assert computed / (32 * 224) == pytest.approx(0.1004, abs=1e-4)


def test_auto_is_flex_on_cuda_and_sdpa_elsewhere() -> None:
    assert resolve_attention("auto", torch.device("cuda")) == "flex"
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attention("reference", torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="unknown attention"):
        resolve_attention("flash", torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_flex_forward_on_cpu_reads_the_block_mask_correctly() -> None:
    """The compiled kernel computes only the blocks the block mask lists (the dense path above
    ignores it): T=300 pads to 384, three query blocks, three steps."""
    q, keys, values, mask, _ = make_inputs((300, 201), 300, 3)
    q, keys, values = q.detach(), [k.detach() for k in keys], [v.detach() for v in values]
    assert padded_length(300) == 384
    with torch.no_grad():
        out = ttt_flex_attention(q, keys, values, mask, HEAD_DIM**-0.5, compiled=True)
        ref = ttt_attention_reference(q, TTTCache(mask, keys=keys, values=values), HEAD_DIM**-0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "lengths", "T"), PADDING_CASES, ids=[c[0] for c in PADDING_CASES])
def test_compiled_flex_on_cuda_equals_the_reference(name: str, lengths, T: int) -> None:
    q, keys, values, mask, weights = make_inputs(lengths, T, 4)
    q = q.detach().cuda().requires_grad_()
    keys = [k.detach().cuda().requires_grad_() for k in keys]
    values = [v.detach().cuda().requires_grad_() for v in values]
    mask, weights = mask.cuda(), weights.cuda()
    out, grads = output_and_grads(ttt_attention_flex, q, keys, values, mask, weights)
    ref_out, ref_grads = output_and_grads(ttt_attention_reference, q, keys, values, mask, weights)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=2e-5, rtol=2e-5)
