"""Draft checkpoints in the SGLang layout: exact keys/shapes/config, lossless round trips,
warm starts from published drafts, and loud failures for anything that does not fit."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from specforge_common.eagle3 import load_draft, save_draft
from specforge_common.eagle3.layout import CheckpointError
from specforge_common.eagle3.vocab import (
    VocabMap,
    VocabMapMismatch,
    apply_vocab_map,
    build_vocab_map,
    vocab_map_of,
)
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft, TTTCache

H, HEADS, KV, HEAD_DIM, INTER, V, V_D = 64, 4, 2, 16, 128, 300, 100

SGLANG_KEYS = {
    "fc.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "t2d",
    "d2t",
}
FC_NORM_KEYS = {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"}


def make_config(**overrides) -> Eagle3Config:
    fields = dict(
        hidden_size=H,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        vocab_size=V,
        draft_vocab_size=V_D,
        rope_theta=500000.0,
        aux_layer_ids=(1, 5, 9),
    )
    return Eagle3Config(**(fields | overrides))


def make_vocab_map(seed: int = 0) -> VocabMap:
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.randint(0, V, (1500,), generator=generator)
    frequent = torch.randint(0, V // 4, (1500,), generator=generator)  # skewed frequencies
    tokens = torch.cat([uniform, frequent])
    return build_vocab_map(Counter(tokens.tolist()), V, V_D)


def make_draft(seed: int = 0, **overrides) -> Eagle3Draft:
    torch.manual_seed(seed)
    draft = Eagle3Draft(make_config(**overrides))
    with torch.no_grad():  # norms start at 1; make them distinct so a swap would show
        for name, param in draft.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    apply_vocab_map(draft, make_vocab_map(seed))
    return draft


def run_draft(draft: Eagle3Draft, seed: int = 1) -> list[torch.Tensor]:
    """project_aux, two TTT steps and logits on a fixed random input (padding included)."""
    generator = torch.Generator().manual_seed(seed)
    B, T = 2, 8
    aux = torch.randn(B, T, 3 * draft.config.aux_hidden_size, generator=generator)
    ids = torch.randint(0, V, (B, T), generator=generator)
    attention_mask = torch.ones(B, T, dtype=torch.int64)
    attention_mask[1, 6:] = 0
    positions = torch.arange(T).expand(B, T)
    cache = TTTCache(attention_mask=attention_mask)
    with torch.no_grad():
        h0 = draft.project_aux(aux)
        h1 = draft.step(ids, h0, positions, cache)
        h2 = draft.step(ids.roll(-1, dims=1), h1, positions + 1, cache)
        return [h0, h1, h2, draft.compute_logits(h1), draft.compute_logits(h2)]


def rewrite(path: Path, change) -> None:
    """Apply ``change(tensors)`` to an export's model.safetensors, keeping its metadata."""
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata)


@pytest.fixture
def draft() -> Eagle3Draft:
    return make_draft()


@pytest.fixture
def exported(draft: Eagle3Draft, tmp_path: Path) -> Path:
    return save_draft(draft, tmp_path / "export")


def test_round_trip_is_lossless(draft: Eagle3Draft, exported: Path) -> None:
    loaded = load_draft(exported, embedding=draft.embed_tokens.weight)
    original, restored = draft.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert original[key].dtype == restored[key].dtype, key
        assert torch.equal(original[key], restored[key]), key
    assert torch.equal(draft._inv_freq, loaded._inv_freq)
    assert not loaded.embed_tokens.weight.requires_grad and loaded.fc.weight.requires_grad
    assert loaded.config.to_dict() | {"specforge": None} == draft.config.to_dict() | {
        "specforge": None,
        "torch_dtype": "float32",
    }
    for got, want in zip(run_draft(loaded), run_draft(draft), strict=True):
        assert torch.equal(got, want)
    assert vocab_map_of(loaded) == vocab_map_of(draft)


def test_export_keys_shapes_and_metadata_are_the_sglang_layout(
    draft: Eagle3Draft, exported: Path
) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == SGLANG_KEYS
    assert not any(k.startswith(("embed", "draft_model.")) for k in keys)
    d = HEAD_DIM
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {
        "fc.weight": (H, 3 * H),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (HEADS * d, 2 * H),
        "midlayer.self_attn.k_proj.weight": (KV * d, 2 * H),
        "midlayer.self_attn.v_proj.weight": (KV * d, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, HEADS * d),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (INTER, H),
        "midlayer.mlp.up_proj.weight": (INTER, H),
        "midlayer.mlp.down_proj.weight": (H, INTER),
        "norm.weight": (H,),
        "lm_head.weight": (V_D, H),
        "t2d": (V,),
        "d2t": (V_D,),
    }
    assert tensors["t2d"].dtype == torch.bool and tensors["d2t"].dtype == torch.int64
    assert tensors["fc.weight"].dtype == torch.float32
    vocab_hash = make_vocab_map().hash()
    assert metadata == {"format": "pt", "vocab_map_hash": vocab_hash}
    assert torch.equal(tensors["d2t"], make_vocab_map().d2t)


def test_export_config_is_what_sglang_reads(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == V_D and config["vocab_size"] == V
    assert config["hidden_size"] == H and config["intermediate_size"] == INTER
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV
    assert config["head_dim"] == HEAD_DIM
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 5, 9]}
    assert config["rope_theta"] == 500000.0
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert config["specforge"] == {"vocab_map_hash": make_vocab_map().hash()}


def test_fc_norm_and_target_hidden_size(tmp_path: Path) -> None:
    draft = make_draft(fc_norm=True, target_hidden_size=48)
    path = save_draft(draft, tmp_path / "fc_norm")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == SGLANG_KEYS | FC_NORM_KEYS
        assert tuple(f.get_tensor("fc.weight").shape) == (H, 3 * 48)
        for key in FC_NORM_KEYS:
            assert tuple(f.get_tensor(key).shape) == (48,)
    config = json.loads((path / "config.json").read_text())
    assert config["fc_norm"] is True and config["target_hidden_size"] == 48
    loaded = load_draft(path, embedding=draft.embed_tokens.weight)
    for got, want in zip(run_draft(loaded), run_draft(draft), strict=True):
        assert torch.equal(got, want)


def test_save_refuses_layouts_sglang_would_not_load(tmp_path: Path) -> None:
    extra = make_draft()
    extra.value_head = nn.Linear(H, 1, bias=False)
    with pytest.raises(CheckpointError, match=r"unexpected \['value_head.weight'\]"):
        save_draft(extra, tmp_path / "a")
    no_norm = make_draft()
    del no_norm.norm
    with pytest.raises(CheckpointError, match=r"missing required SGLang keys \['norm.weight'\]"):
        save_draft(no_norm, tmp_path / "b")
    unmapped = Eagle3Draft(make_config())  # t2d/d2t never set: all-False mask
    with pytest.raises(CheckpointError, match="apply_vocab_map"):
        save_draft(unmapped, tmp_path / "c")
    with pytest.raises(CheckpointError, match="reserved"):
        save_draft(make_draft(), tmp_path / "d", metadata={"vocab_map_hash": "x"})
    with pytest.raises(CheckpointError, match=r"str to str; bad entries: \['step'\]"):
        save_draft(make_draft(), tmp_path / "e", metadata={"step": 3})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp dirs


def test_user_metadata_is_stored(draft: Eagle3Draft, tmp_path: Path) -> None:
    path = save_draft(draft, tmp_path / "m", metadata={"run_id": "r1", "global_step": "40"})
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["run_id"] == "r1" and f.metadata()["global_step"] == "40"


def test_load_refuses_missing_and_unexpected_keys(draft: Eagle3Draft, exported: Path) -> None:
    embedding = draft.embed_tokens.weight
    rewrite(exported, lambda t: t.update({"midlayer.extra_bias": torch.zeros(H)}))
    with pytest.raises(CheckpointError, match=r"does not have: \['midlayer.extra_bias'\]"):
        load_draft(exported, embedding=embedding)
    rewrite(exported, lambda t: (t.pop("midlayer.extra_bias"), t.pop("lm_head.weight")))
    with pytest.raises(CheckpointError, match=r"missing required keys \['lm_head.weight'\]"):
        load_draft(exported, embedding=embedding)
    rewrite(exported, lambda t: t.update({"lm_head.weight": torch.zeros(V_D, H)}))
    rewrite(exported, lambda t: t.pop("midlayer.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \['midlayer.mlp.up_proj.weight'\]"):
        load_draft(exported, embedding=embedding)
    rewrite(
        exported, lambda t: t.update({"midlayer.mlp.up_proj.weight": torch.zeros(INTER + 1, H)})
    )
    with pytest.raises(CheckpointError, match=r"up_proj.weight \(129, 64\) \(config implies"):
        load_draft(exported, embedding=embedding)


def test_load_needs_a_fitting_embedding(draft: Eagle3Draft, exported: Path) -> None:
    with pytest.raises(CheckpointError, match="pass the target's embedding"):
        load_draft(exported)
    with pytest.raises(CheckpointError, match=r"embedding has shape \(300, 32\).*\(300, 64\)"):
        load_draft(exported, embedding=torch.zeros(V, 32))
    random_embedding = load_draft(exported, allow_random_embedding=True)
    assert random_embedding.embed_tokens.weight.shape == (V, H)
    assert torch.equal(random_embedding.lm_head.weight, draft.lm_head.weight)


def test_load_refuses_a_different_vocab_map(draft: Eagle3Draft, exported: Path) -> None:
    embedding = draft.embed_tokens.weight
    same = load_draft(exported, embedding=embedding, vocab_map=make_vocab_map(0))
    assert vocab_map_of(same) == make_vocab_map(0)
    other = make_vocab_map(1)
    assert other != make_vocab_map(0)
    with pytest.raises(VocabMapMismatch) as raised:
        load_draft(exported, embedding=embedding, vocab_map=other)
    assert make_vocab_map(0).hash() in str(raised.value) and other.hash() in str(raised.value)


def test_load_refuses_tampered_buffers(draft: Eagle3Draft, exported: Path) -> None:
    other = make_vocab_map(1)
    rewrite(exported, lambda t: t.update({"d2t": other.d2t, "t2d": other.t2d}))
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        load_draft(exported, embedding=draft.embed_tokens.weight)
    rewrite(exported, lambda t: t.update({"t2d": torch.ones(V, dtype=torch.bool)}))
    with pytest.raises(CheckpointError, match="invalid vocab map"):
        load_draft(exported, embedding=draft.embed_tokens.weight)


class NotATensor:
    pass


def published_config(**overrides) -> dict:
    """Shaped like the configs of published EAGLE-3 drafts (plus unknown fields)."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": 2048,
        "num_attention_heads": HEADS,
        "num_hidden_layers": 1,
        "num_key_value_heads": KV,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 64,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "vocab_size": V,
        "draft_vocab_size": V_D,
        "target_hidden_size": 48,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": [1, 13, 27],
            "use_aux_hidden_state": True,
        },
        "some_future_field": {"nested": [1, 2]},
        **overrides,
    }


def published_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    source = make_draft(seed, target_hidden_size=48)
    return {
        k: v.half() if v.is_floating_point() else v
        for k, v in source.trainable_state_dict().items()
    }


def test_warm_start_from_a_published_pytorch_model_bin(tmp_path: Path) -> None:
    path = tmp_path / "published"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(published_config()))
    weights = published_weights()
    torch.save(weights, path / "pytorch_model.bin")
    embedding = torch.randn(V, H).half()
    loaded = load_draft(path, embedding=embedding)
    assert loaded.config.aux_layer_ids == (1, 13, 27)
    assert loaded.config.target_hidden_size == 48
    assert loaded.config.rope_scaling["rope_type"] == "llama3"
    assert loaded.config.extra["some_future_field"] == {"nested": [1, 2]}
    assert loaded.fc.weight.dtype == torch.float16  # dtype defaults to the file's
    for key, value in weights.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.embed_tokens.weight, embedding)
    # llama3 rope scaling: the lowest frequencies are divided by the factor, in fp32.
    plain = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    assert loaded._inv_freq.dtype == torch.float64
    assert math.isclose(float(loaded._inv_freq[-1]), float(plain[-1]) / 8.0, rel_tol=1e-6)
    assert math.isclose(float(loaded._inv_freq[0]), float(plain[0]), rel_tol=1e-6)

    as_fp32 = load_draft(path, embedding=embedding, dtype=torch.float32)
    assert as_fp32.fc.weight.dtype == torch.float32
    assert torch.equal(as_fp32.fc.weight, weights["fc.weight"].float())

    # Re-exported, it is our layout, with the published extras carried along.
    again = save_draft(as_fp32, tmp_path / "reexport")
    config = json.loads((again / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["pretraining_tp"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 13, 27]


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickle"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(published_config()))
    torch.save(published_weights() | {"payload": NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_draft(path, embedding=torch.zeros(V, H))


def test_prefixes_are_stripped(tmp_path: Path) -> None:
    weights = published_weights()
    bin_dir, st_dir = tmp_path / "bin", tmp_path / "st"
    for directory in (bin_dir, st_dir):
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(published_config()))
    torch.save({f"model.{k}": v for k, v in weights.items()}, bin_dir / "pytorch_model.bin")
    save_file(
        {f"draft_model.{k}": v for k, v in weights.items()}, str(st_dir / "model.safetensors")
    )
    for directory in (bin_dir, st_dir):
        loaded = load_draft(directory, embedding=torch.zeros(V, H))
        assert torch.equal(loaded.lm_head.weight, weights["lm_head.weight"])


def test_sharded_safetensors_index(tmp_path: Path) -> None:
    weights = published_weights()
    path = tmp_path / "sharded"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(published_config()))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:7],
        "model-00002-of-00002.safetensors": names[7:],
    }
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_draft(path, embedding=torch.zeros(V, H))
    for key, value in weights.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_published_drafts_without_t2d_or_buffers(tmp_path: Path) -> None:
    weights = published_weights()
    path = tmp_path / "d2t_only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(published_config()))
    save_file({k: v for k, v in weights.items() if k != "t2d"}, str(path / "model.safetensors"))
    loaded = load_draft(path, embedding=torch.zeros(V, H))
    assert torch.equal(loaded.t2d, weights["t2d"])

    save_file(
        {k: v for k, v in weights.items() if k not in ("t2d", "d2t")},
        str(path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"missing required keys \['t2d', 'd2t'\]"):
        load_draft(path, embedding=torch.zeros(V, H))
    restored = load_draft(path, embedding=torch.zeros(V, H), vocab_map=make_vocab_map(3))
    assert vocab_map_of(restored) == make_vocab_map(3)


def test_atomic_replace_leaves_no_temp_dirs(tmp_path: Path) -> None:
    first, second = make_draft(0), make_draft(1)
    out = tmp_path / "export"
    save_draft(first, out)
    save_draft(second, out)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    (tmp_path / "plain").mkdir()  # the export is as readable as any directory made here
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").rmdir()
    loaded = load_draft(out, embedding=second.embed_tokens.weight)
    assert torch.equal(loaded.fc.weight, second.fc.weight)
    assert vocab_map_of(loaded) == vocab_map_of(second)

    # A failure before writing keeps the previous export as it was.
    with pytest.raises(CheckpointError):
        save_draft(first, out, metadata={"format": "other"})
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert torch.equal(
        load_draft(out, embedding=second.embed_tokens.weight).fc.weight, second.fc.weight
    )

    # A directory holding anything but a previous export is never replaced.
    (out / "training_state.pt").write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="training_state.pt"):
        save_draft(first, out)
    assert (out / "training_state.pt").read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_bf16_round_trip_keeps_dtype_and_bytes(tmp_path: Path) -> None:
    draft = make_draft().to(torch.bfloat16)
    path = save_draft(draft, tmp_path / "bf16")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_draft(path, embedding=draft.embed_tokens.weight)
    for key, value in draft.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype, key
        assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key
    assert loaded._inv_freq.dtype == torch.float64  # rotary angles stay fp32


def test_saving_the_same_weights_twice_gives_identical_bytes(tmp_path: Path) -> None:
    """The CheckpointEvent's sha256 identifies the weights, not the save."""
    import hashlib

    draft = make_draft()
    digests = set()
    for i in range(4):
        save_draft(draft, tmp_path / f"copy-{i}", metadata={"b": "2", "a": "1", "c": "3"})
        digests.add(
            hashlib.sha256((tmp_path / f"copy-{i}" / "model.safetensors").read_bytes()).hexdigest()
        )
    assert len(digests) == 1
