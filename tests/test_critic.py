"""Tests for trpo.critic: the critic fit (fused and autograd trainers) and explained variance.

The reference for the fused trainer (natgrad.mlp.FlatMLP: written-out backward, fused Adam)
is the autograd trainer (``loss.backward()`` and ``torch.optim.Adam.step`` per minibatch) on
a deep copy with the same generator; the minibatches themselves are checked against an
independent replay of the documented split; explained variance against numpy.
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import trpo.critic as critic_module
from trpo.config import TRPOConfig
from trpo.critic import CriticSettings, explained_variance, fit_critic, supports_fast_fit
from trpo.policy import Critic, make_critic

DT = torch.float64


def _space(shape=(5,)):
    return gym.spaces.Box(-1.0, 1.0, shape, dtype=np.float64)


def _problem(n=203, shape=(5,), hidden=(16, 16), seed=0, dtype=DT):
    torch.manual_seed(seed)
    critic = make_critic(_space(shape), hidden).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    obs = torch.randn(n, *shape, generator=gen, dtype=dtype)
    flat = obs.reshape(n, -1)
    returns = torch.sin(3 * flat[:, 0]) + flat[:, -1] ** 2
    return critic, obs, returns


def _fit(critic, opt, obs, returns, epochs, minibatch_size, seed=0):
    # A fresh generator per call: both sides must draw the same permutations.
    settings = CriticSettings(epochs=epochs, minibatch_size=minibatch_size)
    return fit_critic(
        critic, opt, obs, returns, settings, generator=torch.Generator().manual_seed(seed)
    )


def _autograd(monkeypatch, *args, **kwargs):
    """fit_critic with the fused trainer switched off (the reference)."""
    with monkeypatch.context() as m:
        m.setattr(critic_module, "supports_fast_fit", lambda *a: False)
        return _fit(*args, **kwargs)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _adam_state(opt, module):
    return [
        (float(opt.state[p]["step"]), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
        for p in module.parameters()
    ]


@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["flat-obs", "2d-obs"])
def test_fused_fit_equals_the_autograd_fit_and_writes_adam_state_back(shape, monkeypatch):
    critic, obs, returns = _problem(shape=shape)
    ref_critic = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    ref_opt = torch.optim.Adam(ref_critic.parameters(), lr=3e-3)
    assert supports_fast_fit(critic, opt, obs)
    for call in range(2):  # the second call starts from the written-back Adam state
        ref = _autograd(monkeypatch, ref_critic, ref_opt, obs, returns, 3, 32, seed=call)
        got = _fit(critic, opt, obs, returns, 3, 32, seed=call)
        # 203 samples, minibatch 32: K = 7 pieces per epoch (29 samples each).
        assert got.steps == ref.steps == 3 * 7
        assert got.value_loss == pytest.approx(ref.value_loss, rel=1e-12)
        torch.testing.assert_close(_flat(critic), _flat(ref_critic), rtol=1e-12, atol=1e-14)
        for (s, m, v), (rs, rm, rv) in zip(
            _adam_state(opt, critic), _adam_state(ref_opt, ref_critic)
        ):
            assert s == rs == 21.0 * (call + 1)
            torch.testing.assert_close(m, rm, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(v, rv, rtol=1e-12, atol=1e-18)
    # The autograd fit continues from the fused fit's state exactly as from its own.
    _autograd(monkeypatch, critic, opt, obs, returns, 1, 50, seed=9)
    _autograd(monkeypatch, ref_critic, ref_opt, obs, returns, 1, 50, seed=9)
    torch.testing.assert_close(_flat(critic), _flat(ref_critic), rtol=1e-12, atol=1e-14)


def test_fused_fit_float32_matches_the_autograd_fit(monkeypatch):
    critic, obs, returns = _problem(dtype=torch.float32)
    ref_critic = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref_critic.parameters(), lr=1e-3)
    ref = _autograd(monkeypatch, ref_critic, ref_opt, obs, returns, 2, 64)
    got = _fit(critic, opt, obs, returns, 2, 64)
    assert got.value_loss == pytest.approx(ref.value_loss, rel=1e-5)
    torch.testing.assert_close(_flat(critic), _flat(ref_critic), rtol=1e-5, atol=1e-6)


def test_minibatches_are_the_documented_pieces_of_each_permutation():
    # Independent replay: each epoch's permutation in K = ⌈N/mb⌉ tensor_split pieces, the
    # mean squared error of each by autograd and torch.optim.Adam.
    critic, obs, returns = _problem(n=50)
    ref = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    got = _fit(critic, opt, obs, returns, 2, 16, seed=4)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        total = 0.0
        for idx in torch.tensor_split(torch.randperm(50, generator=gen), 4):
            loss = (ref(obs[idx]) - returns[idx]).pow(2).mean()
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            total += float(loss.detach()) * idx.numel()
    assert got.steps == 8
    assert got.value_loss == pytest.approx(total / 50, rel=1e-10)
    torch.testing.assert_close(_flat(critic), _flat(ref), rtol=1e-10, atol=1e-12)


def test_fit_reduces_the_value_loss_on_a_fixed_regression_problem():
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(300, 3, generator=gen) * 2 - 1
    targets = 3.0 * obs[:, 0] - 2.0 * obs[:, 1] * obs[:, 2] + 1.0
    torch.manual_seed(0)
    critic = make_critic(gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float32), (32, 32))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    with torch.no_grad():
        loss_before = float((critic(obs) - targets).pow(2).mean())
    result = _fit(critic, opt, obs, targets, 30, 64)
    with torch.no_grad():
        loss_after = float((critic(obs) - targets).pow(2).mean())
    assert result.steps == 30 * math.ceil(300 / 64)
    assert loss_after < 0.05 * loss_before
    # The reported loss is the last epoch's running loss: close to the final loss.
    assert result.value_loss == pytest.approx(loss_after, rel=1.0, abs=0.05)
    assert result.value_loss < 0.1 * loss_before
    # A minibatch larger than the batch is clipped: one Adam step per epoch.
    assert _fit(critic, opt, obs[:10], targets[:10], 3, 4096).steps == 3


def test_fit_is_reproducible_with_the_same_generator():
    obs = torch.linspace(-1, 1, 64).reshape(32, 2)
    targets = obs.sum(-1)
    space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        critic = make_critic(space, (8,))
        opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
        _fit(critic, opt, obs, targets, 3, 5, seed=7)
        runs.append(_flat(critic))
    assert torch.equal(runs[0], runs[1])


class _ReluCritic(Critic):
    def forward(self, obs):  # a different network: must not take the tanh fast path
        x = obs
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


def test_fast_path_declines_what_it_does_not_reproduce(monkeypatch):
    critic, obs, returns = _problem()
    plain = torch.optim.Adam(critic.parameters(), lr=1e-3)
    assert supports_fast_fit(critic, plain, obs)
    declined = {
        "sgd": torch.optim.SGD(critic.parameters(), lr=1e-3),
        "weight_decay": torch.optim.Adam(critic.parameters(), weight_decay=1e-4),
        "amsgrad": torch.optim.Adam(critic.parameters(), amsgrad=True),
        "subset": torch.optim.Adam(list(critic.parameters())[:2]),
        "two_groups": torch.optim.Adam(
            [{"params": list(critic.parameters())[:2]}, {"params": list(critic.parameters())[2:]}]
        ),
    }
    for name, opt in declined.items():
        assert not supports_fast_fit(critic, opt, obs), name
    assert not supports_fast_fit(critic, plain, obs.float())  # dtype mismatch
    relu = _ReluCritic(_space(), (16, 16)).to(DT)
    assert not supports_fast_fit(relu, torch.optim.Adam(relu.parameters()), obs)
    # A Critic whose forward no longer is the tanh MLP (patched on the class) is caught by
    # the numerical guard, and the autograd trainer fits the network it really is.
    monkeypatch.setattr(Critic, "forward", lambda self, o: 2.0 * self._trunk(o).squeeze(-1))
    ref = copy.deepcopy(critic)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    fit = _fit(critic, plain, obs, returns, 1, 8)
    ref_fit = _autograd(monkeypatch, ref, ref_opt, obs, returns, 1, 8)
    assert fit == ref_fit and fit.steps == 26
    assert torch.equal(_flat(critic), _flat(ref))


def test_settings_validate_read_a_config_and_the_old_keywords_warn():
    with pytest.raises(ValueError, match="epochs"):
        CriticSettings(epochs=0)
    with pytest.raises(ValueError, match="minibatch_size"):
        CriticSettings(minibatch_size=True)
    config = TRPOConfig(critic_epochs=3, critic_minibatch_size=64, cuda_graph=True)
    assert CriticSettings.from_config(config) == CriticSettings(3, 64, True)
    critic, obs, returns = _problem(n=40)
    ref = copy.deepcopy(critic)
    want = _fit(ref, torch.optim.Adam(ref.parameters()), obs, returns, 2, 16)
    opt = torch.optim.Adam(critic.parameters())
    with pytest.warns(DeprecationWarning, match="CriticSettings"):
        got = fit_critic(
            critic,
            opt,
            obs,
            returns,
            epochs=2,
            minibatch_size=16,
            generator=torch.Generator().manual_seed(0),
        )
    assert got == want and torch.equal(_flat(critic), _flat(ref))


def test_explained_variance_matches_the_numpy_formula():
    rng = np.random.default_rng(0)
    returns = rng.normal(size=200)
    values = returns + 0.5 * rng.normal(size=200)
    expected = 1.0 - np.var(returns - values) / np.var(returns)
    got = explained_variance(torch.as_tensor(values), torch.as_tensor(returns))
    assert got == pytest.approx(expected, rel=1e-12)
    # float32 inputs are reduced in float64.
    got32 = explained_variance(torch.as_tensor(values).float(), torch.as_tensor(returns).float())
    assert got32 == pytest.approx(expected, rel=1e-5)
    r = torch.as_tensor(returns)
    assert explained_variance(r.clone(), r) == 1.0
    assert explained_variance(torch.full_like(r, float(r.mean())), r) == pytest.approx(
        0.0, abs=1e-12
    )
    assert math.isnan(explained_variance(torch.zeros(5), torch.ones(5)))
