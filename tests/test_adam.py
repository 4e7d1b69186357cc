"""Tests for natgrad.adam against torch.optim.Adam (the reference it must equal bit for bit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.adam import Adam
from natgrad.mlp import FlatMLP, adam_options


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(net: nn.Module, opt, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 3, generator=gen, dtype=dtype)
        opt.zero_grad()
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_equal_torch_adam_bit_for_bit(dtype):
    ours, ref = _net().to(dtype), _net().to(dtype)
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    _train(ours, Adam(ours.parameters(), **kw), 25)
    _train(ref, torch.optim.Adam(ref.parameters(), foreach=False, **kw), 25)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_is_torch_adams_and_loads_both_ways():
    ours, ref = _net(), _net()
    opt, ref_opt = Adam(ours.parameters(), lr=1e-3), torch.optim.Adam(ref.parameters(), lr=1e-3)
    _train(ours, opt, 5)
    _train(ref, ref_opt, 5)
    mine, theirs = opt.state_dict(), ref_opt.state_dict()
    assert mine["param_groups"][0].keys() == theirs["param_groups"][0].keys()
    assert mine["state"].keys() == theirs["state"].keys()
    for i in mine["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine["state"][i][key], theirs["state"][i][key])
    # torch's state into ours, then 5 more steps on both: the same parameters.
    again = _net()
    again.load_state_dict(ref.state_dict())
    opt2 = Adam(again.parameters(), lr=1e-3)
    opt2.load_state_dict(theirs)
    _train(again, opt2, 5, seed=2)
    _train(ref, ref_opt, 5, seed=2)
    for a, b in zip(again.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # ours into torch's.
    torch_again = torch.optim.Adam(_net().parameters(), lr=1e-3)
    torch_again.load_state_dict(opt2.state_dict())
    assert float(torch_again.state_dict()["state"][0]["step"]) == 10.0


def test_flat_mlp_accepts_it_and_writes_its_state_back():
    net = _net()
    opt = Adam(net.parameters(), lr=1e-2)
    params = list(net.parameters())
    assert adam_options(opt, params) == dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    flat = FlatMLP(params, opt, "tanh")
    x = torch.randn(16, 3)
    with torch.no_grad():
        z, inputs = flat.forward(x)
        flat.backward(torch.ones_like(z), inputs)
        flat.adam_step()
    flat.write_back()
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
    assert opt.state_dict()["state"].keys() == {0, 1, 2, 3}


def test_bad_input_is_a_clear_error():
    net = _net()
    with pytest.raises(ValueError, match="non-empty"):
        Adam([])
    with pytest.raises(ValueError, match="more than once"):
        p = next(net.parameters())
        Adam([p, p])
    for kw, match in (
        (dict(lr=0.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=-1.0), "eps"),
    ):
        with pytest.raises(ValueError, match=match):
            Adam(net.parameters(), **kw)
    opt = Adam(net.parameters())
    with pytest.raises(ValueError, match="one group of 4"):
        opt.load_state_dict(torch.optim.Adam(nn.Linear(2, 2).parameters()).state_dict())
    amsgrad = torch.optim.Adam(_net().parameters(), amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(amsgrad)
