"""The chunked soft cross entropy: the plain autograd formula's value and gradients, without
keeping its ``[B, T, V]`` fp32 tensors for backward."""

from __future__ import annotations

import pytest
import torch

from specforge_common.eagle3.soft_cross_entropy import soft_cross_entropy, token_chunks

B, T, H, V = 3, 7, 16, 40


def make_case(seed: int = 0):
    """Logits from an lm_head weight (so gradients reach it), a teacher distribution, and a
    position mask with zeros (a prompt, a padded tail, an out-of-vocab target)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = (0.5 * torch.randn(V, H, generator=gen)).requires_grad_(True)
    padded = torch.softmax(2 * torch.randn(B, T + 2, V, generator=gen), dim=-1)
    target = padded[:, 2:]  # a view into a longer tensor, like a TTT step's teacher rows
    mask = torch.ones(B, T)
    mask[0, :2] = 0
    mask[1, 5:] = 0
    mask[2, 3] = 0
    return hidden, weight, target, mask


def plain(logits, target, mask):
    return -(mask[..., None] * target * torch.log_softmax(logits, dim=-1)).sum()


@pytest.mark.parametrize("chunk_tokens", [0, 1, 3, 4, 100])
def test_equals_the_plain_formula_in_value_and_gradients(chunk_tokens: int) -> None:
    hidden, weight, target, mask = make_case()
    assert not target.is_contiguous()
    results = []
    for loss_fn in (plain, lambda *a: soft_cross_entropy(*a, chunk_tokens)):
        logits = hidden @ weight.T
        logits.retain_grad()
        loss = loss_fn(logits, target, mask)
        loss.backward()
        results.append((loss.detach(), logits.grad, weight.grad))
        weight.grad = None
    (ref_loss, ref_dlogits, ref_dweight), (loss, dlogits, dweight) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dlogits, ref_dlogits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dweight, ref_dweight, atol=1e-6, rtol=1e-6)
    assert torch.all(dlogits[mask == 0] == 0) and dlogits[mask == 1].abs().sum() > 0


def test_chunks_cover_every_token_once_within_samples() -> None:
    for chunk in (1, 3, 7, 50):
        seen = torch.zeros(B, T, dtype=torch.long)
        for b, t in token_chunks(B, T, chunk):
            assert isinstance(b, int) and (t.stop - t.start) <= chunk
            seen[b, t] += 1
        assert torch.all(seen == 1)
    assert list(token_chunks(B, T, 0)) == [(slice(None), slice(None))]


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs."""
    kept: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(kept.values())


def test_backward_keeps_the_logits_only_not_the_fp32_log_softmax() -> None:
    """The plain formula keeps the log-softmax and the masked teacher, two ``[B, T, V]`` fp32
    tensors beyond the logits; the chunked loss keeps the logits and reads the teacher it is
    given (held by the caller anyway)."""
    hidden, weight, target, mask = make_case()
    logits = (hidden @ weight.T).detach().requires_grad_(True)
    full = B * T * V * 4
    teacher = target.untyped_storage().nbytes()
    plain_kept = saved_bytes(lambda: plain(logits, target, mask))
    chunked_kept = saved_bytes(lambda: soft_cross_entropy(logits, target, mask, 3))
    assert plain_kept >= 2 * full
    assert chunked_kept <= full + teacher + mask.numel() * 4
