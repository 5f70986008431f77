"""The draft vocabulary map: the reference algorithm, its hash, and its file format."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specforge_common.eagle3.vocab import (
    TokenCounter,
    VocabMap,
    VocabMapMismatch,
    apply_vocab_map,
    build_vocab_map,
    vocab_map_of,
)
from specforge_common.models.eagle3 import Eagle3Config, Eagle3Draft


def counted(pairs: list[tuple[int, int]]) -> Counter[int]:
    """A Counter with an explicit insertion (= first-seen) order."""
    counts: Counter[int] = Counter()
    for token, freq in pairs:
        counts[token] += freq
    return counts


def test_known_frequency_table() -> None:
    # Supervised positions: 7 x3, 2 x1, 15 x3, 4 x2, 11 x1, 9 x2, 0 x1 (in first-seen order).
    # Token 11 also appears 5 times unsupervised, which must not count.
    ids = [7, 2, 11, 15, 7, 4, 11, 15, 11, 9, 7, 11, 4, 15, 0, 11, 9, 11]
    mask = [1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0]
    counter = TokenCounter()
    counter.update(ids, mask)
    assert list(counter.counts.items()) == [
        (7, 3),
        (2, 1),
        (15, 3),
        (4, 2),
        (11, 1),
        (9, 2),
        (0, 1),
    ]
    assert counter.num_tokens == 13

    vocab_map = build_vocab_map(counter.counts, target_vocab_size=20, draft_vocab_size=5)
    # Top 5: 7 (3), 15 (3), 4 (2), 9 (2), then the first-seen of the count-1 ties (2, 11, 0): 2.
    used = sorted([7, 15, 4, 9, 2])
    assert used == [2, 4, 7, 9, 15]
    assert vocab_map.d2t.tolist() == [used[i] - i for i in range(5)] == [2, 3, 5, 6, 11]
    assert vocab_map.d2t.dtype == torch.int64
    assert vocab_map.t2d.dtype == torch.bool
    assert vocab_map.t2d.nonzero().flatten().tolist() == used
    assert vocab_map.target_vocab_size == 20 and vocab_map.draft_vocab_size == 5
    assert vocab_map.target_to_draft_ids().tolist() == used
    vocab_map.validate()


def test_fill_rule_when_fewer_ids_seen_than_draft_vocab() -> None:
    counts = counted([(5, 4), (1, 2)])
    vocab_map = build_vocab_map(counts, target_vocab_size=10, draft_vocab_size=4)
    # Seen {5, 1}; fill with 0, 2 (1 is already present) -> {0, 1, 2, 5}.
    assert vocab_map.target_to_draft_ids().tolist() == [0, 1, 2, 5]
    assert vocab_map.d2t.tolist() == [0, 0, 0, 2]
    assert counts == counted([(5, 4), (1, 2)])  # the caller's counts are not modified

    nothing_seen = build_vocab_map(Counter(), target_vocab_size=10, draft_vocab_size=3)
    assert nothing_seen.target_to_draft_ids().tolist() == [0, 1, 2]


def test_ties_break_by_first_seen_order_across_updates() -> None:
    counter = TokenCounter()
    counter.update([8, 5, 3, 5], [0, 1, 1, 1])  # 5 seen first, then 3; 8 is masked
    counter.update([8, 3, 1], [1, 1, 1])  # 8 and 1 are new: after 5 and 3
    assert list(counter.counts.items()) == [(5, 2), (3, 2), (8, 1), (1, 1)]
    assert build_vocab_map(counter.counts, 10, 3).target_to_draft_ids().tolist() == [3, 5, 8]

    later_first = TokenCounter()
    later_first.update([9, 6, 6, 9, 2], [1, 1, 1, 1, 1])  # 9 and 6 tie at 2; 9 was seen first
    assert build_vocab_map(later_first.counts, 10, 1).target_to_draft_ids().tolist() == [9]


def test_counter_matches_a_plain_python_count() -> None:
    rng = random.Random(0)
    counter, expected = TokenCounter(), Counter()
    for _ in range(20):
        length = rng.randint(0, 60)
        ids = [rng.randrange(40) for _ in range(length)]
        mask = [rng.random() < 0.6 for _ in range(length)]
        counter.update(torch.tensor(ids), torch.tensor(mask, dtype=torch.int64), max_length=50)
        for token, m in list(zip(ids, mask, strict=True))[:50]:
            if m:
                expected[token] += 1
    assert list(counter.counts.items()) == list(expected.items())
    reference = sorted(t for t, _ in expected.most_common(12))
    assert build_vocab_map(counter.counts, 40, 12).target_to_draft_ids().tolist() == reference


def test_only_loss_masked_positions_and_max_length() -> None:
    counter = TokenCounter()
    counter.update([1, 2, 3, 4, 5], [1, 0, 1, 1, 1], max_length=3)
    assert dict(counter.counts) == {1: 1, 3: 1}
    counter.update(torch.tensor([[6, 7, 8], [9, 9, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]]), 2)
    assert dict(counter.counts) == {1: 1, 3: 1, 6: 1, 7: 1, 9: 1}
    counter.update([4, 4], [True, True], max_length=0)
    assert 4 not in counter.counts
    with pytest.raises(ValueError, match="shape"):
        counter.update([1, 2, 3], [1, 1])


def test_build_rejects_bad_sizes_and_ids() -> None:
    with pytest.raises(ValueError, match="exceeds the target vocab size"):
        build_vocab_map(counted([(1, 1)]), target_vocab_size=4, draft_vocab_size=5)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        build_vocab_map(counted([(1, 3), (12, 1)]), target_vocab_size=10, draft_vocab_size=2)
    with pytest.raises(ValueError, match="outside"):
        build_vocab_map(counted([(-100, 3)]), target_vocab_size=10, draft_vocab_size=2)


def test_identity_map() -> None:
    identity = VocabMap.identity(7)
    identity.validate()
    assert identity.d2t.tolist() == [0] * 7 and identity.t2d.all()
    built = build_vocab_map(counted([(3, 9), (1, 2)]), target_vocab_size=7, draft_vocab_size=7)
    assert built == identity and built.hash() == identity.hash()


def test_hash_equal_for_equal_maps_and_different_otherwise() -> None:
    a = build_vocab_map(counted([(7, 3), (2, 1), (4, 2)]), 20, 3)
    b = VocabMap(d2t=a.d2t.clone(), t2d=a.t2d.clone())
    assert a == b and a.hash() == b.hash() and len(a.hash()) == 16
    other = build_vocab_map(counted([(7, 3), (2, 1), (5, 2)]), 20, 3)
    assert other != a and other.hash() != a.hash()
    # Same buffer contents in a bigger target vocab is a different map.
    wider = VocabMap(d2t=a.d2t, t2d=torch.cat([a.t2d, torch.zeros(1, dtype=torch.bool)]))
    assert wider.hash() != a.hash()
    assert VocabMap.identity(5).hash() != VocabMap.identity(6).hash()


def test_draft_to_target_matches_used() -> None:
    vocab_map = build_vocab_map(counted([(13, 5), (2, 4), (29, 3), (8, 2)]), 30, 4)
    used = [2, 8, 13, 29]
    assert vocab_map.draft_to_target(torch.arange(4)).tolist() == used
    assert vocab_map.draft_to_target(torch.tensor([[3, 0], [1, 1]])).tolist() == [[29, 2], [8, 8]]
    # Draft logits over the target vocab are target_logits[..., t2d] in draft id order.
    target_logits = torch.arange(30.0)
    assert target_logits[vocab_map.t2d].tolist() == [float(t) for t in used]


def test_validate_catches_inconsistent_maps() -> None:
    good = build_vocab_map(counted([(1, 3), (4, 2), (6, 1)]), 8, 3)  # used [1, 4, 6]
    good.validate()
    t2d_count = good.t2d.clone()
    t2d_count[0] = True
    with pytest.raises(VocabMapMismatch, match="t2d marks 4 target ids but d2t has 3"):
        VocabMap(d2t=good.d2t, t2d=t2d_count).validate()
    with pytest.raises(VocabMapMismatch, match="strictly ascending"):
        VocabMap(d2t=torch.tensor([4, 0, 4]), t2d=good.t2d).validate()  # used [4, 1, 6]
    with pytest.raises(VocabMapMismatch, match="which t2d does not mark"):
        VocabMap(d2t=torch.tensor([1, 2, 4]), t2d=good.t2d).validate()  # used [1, 3, 6]
    with pytest.raises(VocabMapMismatch, match=r"outside \[0, 8\)"):
        VocabMap(d2t=torch.tensor([1, 3, 6]), t2d=good.t2d).validate()  # used [1, 4, 8]
    with pytest.raises(ValueError, match="bool"):
        VocabMap(d2t=good.d2t, t2d=good.t2d.to(torch.int64))


def test_save_load_round_trip_and_tamper_detection(tmp_path) -> None:
    vocab_map = build_vocab_map(counted([(13, 5), (2, 4), (29, 3), (8, 2)]), 30, 4)
    path = vocab_map.save(tmp_path / "maps" / "vocab.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["vocab.safetensors"]  # no temp files
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["vocab_map_hash"] == vocab_map.hash()
    loaded = VocabMap.load(path)
    assert loaded == vocab_map and loaded.hash() == vocab_map.hash()
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle

    # Same metadata, different (still consistent) contents: refused.
    other = build_vocab_map(counted([(13, 5), (3, 4), (29, 3), (8, 2)]), 30, 4)
    tampered = tmp_path / "tampered.safetensors"
    save_file(
        {"d2t": other.d2t, "t2d": other.t2d}, str(tampered), {"vocab_map_hash": vocab_map.hash()}
    )
    with pytest.raises(VocabMapMismatch, match="was modified"):
        VocabMap.load(tampered)
    unhashed = tmp_path / "unhashed.safetensors"
    save_file({"d2t": other.d2t, "t2d": other.t2d}, str(unhashed))
    with pytest.raises(VocabMapMismatch, match="no 'vocab_map_hash'"):
        VocabMap.load(unhashed)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(VocabMapMismatch, match="cannot read"):
        VocabMap.load(garbage)


def test_load_reference_torch_map(tmp_path) -> None:
    """The reference saves ``torch.save({"d2t", "t2d"})``; read it with weights_only."""
    vocab_map = build_vocab_map(counted([(13, 5), (2, 4)]), 30, 2)
    path = tmp_path / "mapping.pt"
    torch.save({"d2t": vocab_map.d2t, "t2d": vocab_map.t2d}, path)
    assert VocabMap.load(path) == vocab_map


def tiny_draft(vocab: int = 30, draft_vocab: int = 4) -> Eagle3Draft:
    return Eagle3Draft(
        Eagle3Config(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=vocab,
            draft_vocab_size=draft_vocab,
        )
    )


def test_apply_and_read_back_from_a_draft() -> None:
    draft = tiny_draft()
    vocab_map = build_vocab_map(counted([(13, 5), (2, 4), (29, 3), (8, 2)]), 30, 4)
    apply_vocab_map(draft, vocab_map)
    assert vocab_map_of(draft) == vocab_map
    assert draft.draft_to_target(torch.arange(4)).tolist() == [2, 8, 13, 29]
    with pytest.raises(VocabMapMismatch, match="target vocab of 31 tokens"):
        apply_vocab_map(draft, build_vocab_map(counted([(1, 1)]), 31, 4))
    with pytest.raises(VocabMapMismatch, match="has 5 draft tokens"):
        apply_vocab_map(draft, build_vocab_map(counted([(1, 1)]), 30, 5))
    assert vocab_map_of(draft) == vocab_map  # failed applies change nothing
