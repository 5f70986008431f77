"""The shared byte format: standard safetensors, an independent xxh3-128 checksum, strict decode."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import xxhash

from specforge_common.contracts import FeatureLocation, TensorSpec
from specforge_common.featurestore import codec
from specforge_common.featurestore.errors import FeatureCorruptError, FeatureStoreError


def _location(data: bytes | bytearray, specs: tuple[TensorSpec, ...]) -> FeatureLocation:
    return FeatureLocation(
        uri="file:xx/s.safetensors", tensors=specs, nbytes=len(data), checksum=codec.checksum(data)
    )


def _raw(header: dict, data: bytes = b"") -> bytearray:
    head = json.dumps(header).encode()
    return bytearray(len(head).to_bytes(8, "little") + head + data)


def _sample() -> dict[str, torch.Tensor]:
    return {
        "hidden_states": torch.randn(3, 5).to(torch.bfloat16),
        "input_ids": torch.arange(7, dtype=torch.int64),
        "loss_mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(2.5, dtype=torch.float16),
    }


def test_checksum_is_xxh3_128_of_the_stored_bytes() -> None:
    buf, _ = codec.encode(_sample())
    expected = "xxh3_128:" + xxhash.xxh3_128(bytes(buf)).hexdigest()
    assert codec.checksum(buf) == expected
    hasher = codec.new_hasher()
    hasher.update(bytes(buf)[:10])
    hasher.update(bytes(buf)[10:])
    assert codec.checksum_string(hasher) == expected


def test_encoded_bytes_are_standard_safetensors() -> None:
    tensors = _sample()
    buf, specs = codec.encode(tensors)
    loaded = safetensors.torch.load(bytes(buf))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert [s.name for s in specs] == list(tensors)  # the caller's order
    header_len = int.from_bytes(buf[:8], "little")
    assert (8 + header_len) % 8 == 0
    header = json.loads(bytes(buf[8 : 8 + header_len]))
    for name, tensor in tensors.items():
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]  # fmt: skip


@pytest.mark.parametrize(
    "tensors",
    [
        {f"t{i}": torch.arange(15).reshape(3, 5).to(d) for i, d in enumerate(DTYPES)},
        {"scalar": torch.tensor(2.5), "empty": torch.zeros(4, 0, dtype=torch.int32)},
        {"strided": torch.arange(24.0).reshape(4, 6).t(), "z": torch.arange(3, dtype=torch.int8)},
    ],
    ids=["every-dtype", "scalar-and-empty", "non-contiguous"],
)
def test_a_planned_layout_writes_the_encoded_bytes_into_a_callers_buffer(
    tensors: dict[str, torch.Tensor],
) -> None:
    layout = codec.plan(tensors)
    target = bytearray(b"\xee" * (layout.nbytes + 100))
    written = layout.write_into(target)
    expected, specs = codec.encode(tensors)
    assert len(written) == layout.nbytes == len(expected) and layout.specs == specs
    assert bytes(target[: layout.nbytes]) == bytes(expected)
    assert target[layout.nbytes :] == b"\xee" * 100  # nothing past the sample is touched
    assert codec.checksum(written) == codec.checksum(expected)


def test_write_into_refuses_an_unusable_buffer() -> None:
    layout = codec.plan(_sample())
    with pytest.raises(ValueError, match="needs"):
        layout.write_into(bytearray(layout.nbytes - 1))
    with pytest.raises(ValueError, match="read-only"):
        layout.write_into(bytes(layout.nbytes))


def test_library_written_bytes_decode() -> None:
    tensors = _sample()
    data = safetensors.torch.save(tensors)
    specs = tuple(
        TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for n, t in tensors.items()
    )
    out = codec.decode(bytearray(data), _location(data, specs))
    for name, tensor in tensors.items():
        assert torch.equal(out[name], tensor)


def test_decode_returns_views_of_the_buffer() -> None:
    buf, specs = codec.encode({"x": torch.zeros(4, dtype=torch.int32)})
    out = codec.decode(buf, _location(buf, specs))
    out["x"][0] = 7
    assert torch.equal(codec.decode(buf, _location(buf, specs))["x"][0], torch.tensor(7).int())


def test_encode_refuses_what_it_cannot_store() -> None:
    with pytest.raises(ValueError, match="complex64"):
        codec.encode({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError):
        codec.encode({"x": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        codec.encode({"__metadata__": torch.zeros(1)})


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (bytearray(b"\x01\x00"), "too short"),
        (bytearray((1000).to_bytes(8, "little") + b"{}"), "exceeds"),
        (bytearray((2).to_bytes(8, "little") + b"{x"), "JSON"),
        (_raw([]), "not a JSON object"),  # type: ignore[arg-type]
        (_raw({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "dtype"),
        (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "shape"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)), "offsets"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), "offsets"),
        (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8)), "offsets"),
    ],
)
def test_decode_refuses_bad_headers(raw: bytearray, match: str) -> None:
    spec = TensorSpec("x", "float32", (2,))
    with pytest.raises(FeatureCorruptError, match=match):
        codec.decode(raw, _location(raw, (spec,)))


def test_decode_refuses_specs_that_disagree() -> None:
    buf, _ = codec.encode({"x": torch.zeros(2, 3), "y": torch.zeros(1, dtype=torch.int64)})
    good_y = TensorSpec("y", "int64", (1,))
    for specs in [
        (TensorSpec("x", "bfloat16", (2, 3)), good_y),  # dtype
        (TensorSpec("x", "float32", (3, 2)), good_y),  # shape
        (TensorSpec("x", "float32", (2, 3)),),  # a tensor missing
        (TensorSpec("x", "float32", (2, 3)), good_y, TensorSpec("z", "int64", (1,))),  # extra
        (TensorSpec("x", "float32", (2, 3)), good_y, good_y),  # duplicate
    ]:
        with pytest.raises(FeatureCorruptError):
            codec.decode(buf, _location(buf, specs))


def test_unknown_checksum_algorithm_is_refused() -> None:
    loc = FeatureLocation(uri="file:a/b", tensors=(), nbytes=8, checksum="sha256:00")
    with pytest.raises(FeatureStoreError, match="sha256"):
        codec.check_algorithm(loc)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a..b", "..", "a b", "x" * 201, "é", 3])
def test_invalid_sample_ids(bad: object) -> None:
    with pytest.raises(ValueError):
        codec.validate_sample_id(bad)  # type: ignore[arg-type]


def test_valid_sample_ids() -> None:
    for good in ["a", "run-1_abc.0", "x" * 200, "0123abcdef"]:
        assert codec.validate_sample_id(good) == good
