"""HFTargetEngine against HF transformers itself, on real tiny Llama / Qwen2 / Qwen3 targets.

On the CPU the engine's linear layers take the skinny route for few rows (see
``models/skinny_linear.py``), so its states equal HF's to float rounding (``TOL``), not bit for
bit; a wrong layer or a missing norm is off by orders of magnitude more."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specforge_common.targets import HFTargetEngine, TargetEngine, make_tiny_target

ARCHS = ("llama", "qwen2", "qwen3")
H = 64
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("targets")
    return {arch: make_tiny_target(root / arch, arch=arch, seed=11) for arch in ARCHS}


def _reference(path: Path):
    """An independent HF load of the same checkpoint: the ground truth."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _right_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _ids(len(lengths), max(lengths), seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_aux_ids_pick_hf_hidden_states_id_plus_one(targets: dict[str, Path], arch: str) -> None:
    engine = HFTargetEngine.from_pretrained(targets[arch])
    assert engine.aux_layer_ids == (1, 3, 4)  # default for 8 layers
    ids = _ids(2, 16)
    out = engine.capture(ids, torch.ones_like(ids))
    assert out.aux_hidden_states.shape == (2, 16, 3 * H)
    assert out.hidden_states.shape == (2, 16, H)
    with torch.no_grad():
        states = _reference(targets[arch])(ids, output_hidden_states=True).hidden_states
    for slot, layer in enumerate(engine.aux_layer_ids):
        got = out.aux_hidden_states[..., slot * H : (slot + 1) * H]
        torch.testing.assert_close(got, states[layer + 1], **TOL, msg=f"{slot}, {layer}")
        assert (got - states[layer]).abs().max() > 1e-2  # an off-by-one would not go unnoticed


@pytest.mark.parametrize("arch", ARCHS)
def test_final_hidden_is_post_norm_lm_head_input(targets: dict[str, Path], arch: str) -> None:
    engine = HFTargetEngine.from_pretrained(targets[arch])
    ids = _ids(2, 12, seed=1)
    out = engine.capture(ids, torch.ones_like(ids))
    reference = _reference(targets[arch])
    with torch.no_grad():
        hf = reference(ids, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states, hf.hidden_states[-1], **TOL)
        # hidden_states[-1] being post-norm is what makes lm_head(hidden) the logits:
        torch.testing.assert_close(reference.lm_head(out.hidden_states), hf.logits, **TOL)


def test_explicit_last_layer_id_means_hf_hidden_states_n(targets: dict[str, Path]) -> None:
    engine = HFTargetEngine.from_pretrained(targets["llama"], aux_layer_ids=[0, 5, 7])
    ids = _ids(1, 10, seed=2)
    out = engine.capture(ids, torch.ones_like(ids))
    with torch.no_grad():
        states = _reference(targets["llama"])(ids, output_hidden_states=True).hidden_states
    for slot, layer in enumerate((0, 5, 7)):
        got = out.aux_hidden_states[..., slot * H : (slot + 1) * H]
        torch.testing.assert_close(got, states[layer + 1], **TOL)


def test_draft_config_ids_are_used(targets: dict[str, Path]) -> None:
    draft = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 4, 6]}}
    engine = HFTargetEngine.from_pretrained(targets["qwen3"], draft_config=draft)
    assert engine.aux_layer_ids == (2, 4, 6)
    with pytest.raises(ValueError):
        HFTargetEngine.from_pretrained(targets["qwen3"], aux_layer_ids=[1, 2, 8])


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_single_rows(targets: dict[str, Path], arch: str) -> None:
    engine = HFTargetEngine.from_pretrained(targets[arch])
    lengths = [24, 17, 9]
    ids, mask = _right_padded(lengths, seed=3)
    batch = engine.capture(ids, mask)
    for row, n in enumerate(lengths):
        single = engine.capture(ids[row : row + 1, :n], mask[row : row + 1, :n])
        aux_err = (batch.aux_hidden_states[row, :n] - single.aux_hidden_states[0]).abs().max()
        final_err = (batch.hidden_states[row, :n] - single.hidden_states[0]).abs().max()
        assert aux_err <= 1e-5 and final_err <= 1e-5, (row, aux_err, final_err)


def test_capture_never_runs_the_full_vocab_head(targets: dict[str, Path]) -> None:
    engine = HFTargetEngine.from_pretrained(targets["llama"])
    calls = []
    engine.model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    ids = _ids(1, 8)
    engine.capture(ids, torch.ones_like(ids))
    assert calls == []
    engine.forward_logits(ids)
    assert calls == [1]  # the probe itself works


def test_capture_leaves_no_hooks_behind(targets: dict[str, Path]) -> None:
    engine = HFTargetEngine.from_pretrained(targets["llama"])
    ids = _ids(1, 8)
    engine.capture(ids, torch.ones_like(ids))
    assert all(not layer._forward_hooks for layer in engine.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_logits_equal_hf(targets: dict[str, Path], arch: str) -> None:
    engine = HFTargetEngine.from_pretrained(targets[arch])
    ids, mask = _right_padded([14, 9], seed=4)
    with torch.no_grad():
        expected = _reference(targets[arch])(ids, attention_mask=mask).logits
    logits = engine.forward_logits(ids, mask)
    assert logits.shape == (2, 14, 512)
    torch.testing.assert_close(logits, expected, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_hf_generate(targets: dict[str, Path], arch: str) -> None:
    engine = HFTargetEngine.from_pretrained(targets[arch])
    reference = _reference(targets[arch])
    lengths = [11, 6, 3]
    ids, mask = _right_padded(lengths, seed=5)
    got = engine.generate(ids, mask, max_new_tokens=12)
    for row, n in enumerate(lengths):
        prompt = ids[row : row + 1, :n]
        with torch.no_grad():
            expected = reference.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12
            )
        assert got[row] == expected[0, n:].tolist(), row
    # Left padding is accepted as well.
    left = torch.zeros_like(ids)
    left_mask = torch.zeros_like(mask)
    for row, n in enumerate(lengths):
        left[row, ids.shape[1] - n :] = ids[row, :n]
        left_mask[row, ids.shape[1] - n :] = 1
    assert engine.generate(left, left_mask, max_new_tokens=12) == got


def test_rows_stop_after_their_first_stop_token(targets: dict[str, Path]) -> None:
    engine = HFTargetEngine.from_pretrained(targets["llama"])
    ids, mask = _right_padded([8, 5], seed=6)
    free = engine.generate(ids, mask, max_new_tokens=10, stop_token_ids=[])
    assert [len(r) for r in free] == [10, 10]
    stop = free[0][3]
    cut = engine.generate(ids, mask, max_new_tokens=10, stop_token_ids=[stop])
    first = free[0].index(stop)
    assert cut[0] == free[0][: first + 1]
    assert cut[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_sampling_is_seeded_and_keeps_the_global_rng(targets: dict[str, Path]) -> None:
    engine = HFTargetEngine.from_pretrained(targets["qwen2"])
    ids, mask = _right_padded([7, 4], seed=7)
    state = torch.random.get_rng_state()
    a = engine.generate(ids, mask, max_new_tokens=16, temperature=1.0, seed=123)
    b = engine.generate(ids, mask, max_new_tokens=16, temperature=1.0, seed=123)
    c = engine.generate(ids, mask, max_new_tokens=16, temperature=1.0, seed=124)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == b
    assert a != c
    greedy = engine.generate(ids, mask, max_new_tokens=16, stop_token_ids=[])
    assert a != greedy  # temperature 1 over a random tiny model is far from argmax
    # The temperature is really applied: near 0 sampling is argmax.
    cold = engine.generate(
        ids, mask, max_new_tokens=16, temperature=1e-4, seed=1, stop_token_ids=[]
    )
    assert cold == greedy


def test_info_protocol_and_tokenizer(tmp_path: Path) -> None:
    path = make_tiny_target(tmp_path, arch="qwen3", num_layers=6, tie_word_embeddings=True)
    engine = HFTargetEngine.from_pretrained(path)
    assert isinstance(engine, TargetEngine)
    info = engine.info
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (6, 64, 512)
    assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (4, 2, 16)
    assert info.model_type == "qwen3" and info.tie_word_embeddings
    assert info.eos_token_ids == (2,) and info.pad_token_id == 0
    assert engine.aux_layer_ids == (1, 2, 2)
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert not any(p.requires_grad for p in engine.model.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_on_cuda_equals_hf_on_cuda(targets: dict[str, Path], dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    path = targets["llama"]
    engine = HFTargetEngine.from_pretrained(path, device="cuda", dtype=dtype)
    assert engine.device.type == "cuda" and engine.dtype == dtype
    ids, mask = _right_padded([20, 13], seed=8)
    out = engine.capture(ids, mask)
    assert out.aux_hidden_states.device.type == "cuda" and out.aux_hidden_states.dtype == dtype
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    with torch.no_grad():
        states = reference(ids.cuda(), attention_mask=mask.cuda(), output_hidden_states=True)
    states = states.hidden_states
    for slot, layer in enumerate(engine.aux_layer_ids):
        got = out.aux_hidden_states[..., slot * H : (slot + 1) * H]
        torch.testing.assert_close(got, states[layer + 1], **TOL)
    assert torch.equal(out.hidden_states, states[-1])
    # And close to the fp32 CPU features on real positions.
    cpu = HFTargetEngine.from_pretrained(path).capture(ids, mask)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for row, n in enumerate([20, 13]):
        torch.testing.assert_close(
            out.hidden_states[row, :n].float().cpu(), cpu.hidden_states[row, :n], rtol=tol, atol=tol
        )
    with torch.no_grad():
        expected = reference.generate(
            ids[:1, :20].cuda(), attention_mask=mask[:1].cuda(), do_sample=False, max_new_tokens=5
        )
    assert engine.generate(ids[:1], mask[:1], max_new_tokens=5)[0] == expected[0, 20:].tolist()
