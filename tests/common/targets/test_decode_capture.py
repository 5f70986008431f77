"""Decode mode in one pass (``generate_and_capture``) against two independent passes: HF's own
``generate`` for the replies, then a full forward (``capture``) over prompt + reply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specforge_common.targets import HFTargetEngine, make_tiny_target

ARCHS = ("llama", "qwen3")


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("targets")
    return {arch: make_tiny_target(root / arch, arch=arch, seed=3) for arch in ARCHS}


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


def _reference(engine: HFTargetEngine, prompt: list[int], **kw) -> list[int]:
    ids = torch.tensor([prompt])
    return engine.generate(ids, torch.ones_like(ids), **kw)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_replies_and_features_equal_generate_then_capture(
    targets: dict[str, Path], arch: str
) -> None:
    engine = HFTargetEngine.from_pretrained(targets[arch])
    prompts = _prompts([9, 4, 13], seed=1)
    limits = [12, 7, 10]
    out = engine.generate_and_capture(prompts, max_new_tokens=limits, stop_token_ids=[])
    for prompt, limit, row in zip(prompts, limits, out, strict=True):
        assert row.reply == _reference(engine, prompt, max_new_tokens=limit, stop_token_ids=[])
        ids = torch.tensor([prompt + row.reply])
        full = engine.capture(ids, torch.ones_like(ids))
        n = ids.shape[1]
        assert row.aux_hidden_states.shape == (n, 3 * engine.info.hidden_size)
        assert row.hidden_states.shape == (n, engine.info.hidden_size)
        torch.testing.assert_close(row.aux_hidden_states, full.aux_hidden_states[0],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        torch.testing.assert_close(row.hidden_states, full.hidden_states[0], rtol=1e-4, atol=1e-4)


def test_rows_stop_after_their_first_stop_token_and_keep_its_features(
    targets: dict[str, Path],
) -> None:
    engine = HFTargetEngine.from_pretrained(targets["llama"])
    prompts = _prompts([8, 5], seed=2)
    free = engine.generate_and_capture(prompts, max_new_tokens=10, stop_token_ids=[])
    stop = free[0].reply[3]
    cut = engine.generate_and_capture(prompts, max_new_tokens=10, stop_token_ids=[stop])
    for prompt, a, b in zip(prompts, free, cut, strict=True):
        expected = a.reply[: a.reply.index(stop) + 1] if stop in a.reply else a.reply
        assert b.reply == expected
        n = len(prompt) + len(b.reply)
        torch.testing.assert_close(b.hidden_states, a.hidden_states[:n], rtol=1e-4, atol=1e-4)


def test_sampling_follows_each_rows_seed(targets: dict[str, Path]) -> None:
    engine = HFTargetEngine.from_pretrained(targets["llama"])
    prompts = _prompts([7, 7], seed=3)
    state = torch.random.get_rng_state()
    kw = dict(max_new_tokens=16, temperature=1.0, stop_token_ids=[])
    both = engine.generate_and_capture(prompts, seeds=[11, 12], **kw)
    alone = engine.generate_and_capture(prompts[:1], seeds=[11], **kw)
    other = engine.generate_and_capture(prompts[:1], seeds=[13], **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert both[0].reply == alone[0].reply  # its own seed, whatever its batch mates
    assert other[0].reply != alone[0].reply
    greedy = engine.generate_and_capture(prompts[:1], max_new_tokens=16, stop_token_ids=[])
    assert alone[0].reply != greedy[0].reply
