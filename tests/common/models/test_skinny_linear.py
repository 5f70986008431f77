"""``skinny_linears``: the same function as ``nn.Linear`` for any row count, gradients included,
and the same parameters (a tied weight stays tied)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specforge_common.models.skinny_linear import SkinnyLinear, skinny_linears


@pytest.mark.parametrize("rows", [1, 3, 64, 65, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear_forward_and_backward(rows: int, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).double()
    skinny = SkinnyLinear(linear)
    x = torch.randn(2, rows, 48, dtype=torch.float64, requires_grad=True)
    expected = linear(x)
    got = skinny(x)
    assert got.shape == expected.shape == (2, rows, 80)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(got.square().sum(), x)
    (e,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_swaps_every_linear_and_keeps_tied_weights() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                          nn.Linear(8, 10, bias=False))  # fmt: skip
    model[2].weight = model[0].weight  # tied, as in the target's lm_head
    before = {id(p) for p in model.parameters()}
    skinny_linears(model)
    assert isinstance(model[1][0], SkinnyLinear) and isinstance(model[2], SkinnyLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert {id(p) for p in model.parameters()} == before
    assert model[2].weight is model[0].weight
