"""Tests for trpo.fast_critic and the fast paths of trpo.update.

The reference for the fused critic fit is the generic loop of ``fit_critic`` (autograd
``backward`` and ``torch.optim.Adam.step`` per minibatch), run on a deep copy with the same
generator; for ``policy_step``'s reuse of the Fisher's linearisation, the step computed
without it (an operator that exposes no cached outputs / ``vjp``) and the sequential line
search.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import trpo.update as update_module
from natgrad.linop import LinearOperator
from trpo.fast_critic import fit_mlp_critic, supports_fast_fit
from trpo.policy import Critic, make_actor, make_critic, sample
from trpo.update import PolicyBatch, fit_critic, policy_step

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


def _generic(critic, opt, obs, returns, **kwargs):
    """fit_critic with the fast path switched off (the reference)."""
    original = update_module.fit_mlp_critic
    update_module.fit_mlp_critic = lambda *a, **k: None
    try:
        return fit_critic(critic, opt, obs, returns, **kwargs)
    finally:
        update_module.fit_mlp_critic = original


def _options(epochs, minibatch_size, seed=0):
    # A fresh generator per call: both sides must draw the same permutations.
    return dict(
        epochs=epochs,
        minibatch_size=minibatch_size,
        generator=torch.Generator().manual_seed(seed),
    )


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _adam_state(opt, module):
    return [
        (float(opt.state[p]["step"]), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
        for p in module.parameters()
    ]


@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["flat-obs", "2d-obs"])
def test_fused_fit_equals_the_generic_loop_and_writes_adam_state_back(shape):
    critic, obs, returns = _problem(shape=shape)
    ref_critic = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    ref_opt = torch.optim.Adam(ref_critic.parameters(), lr=3e-3)
    for call in range(2):  # the second call starts from the written-back Adam state
        ref = _generic(ref_critic, ref_opt, obs, returns, **_options(3, 32, seed=call))
        got = fit_critic(critic, opt, obs, returns, **_options(3, 32, seed=call))
        # 203 samples in minibatches of 32: 7 steps per epoch, the last one of 11 samples.
        assert got.steps == ref.steps == 3 * 7
        assert got.value_loss == pytest.approx(ref.value_loss, rel=1e-12)
        torch.testing.assert_close(_flat(critic), _flat(ref_critic), rtol=1e-12, atol=1e-14)
        for (s, m, v), (rs, rm, rv) in zip(
            _adam_state(opt, critic), _adam_state(ref_opt, ref_critic)
        ):
            assert s == rs == 21.0 * (call + 1)
            torch.testing.assert_close(m, rm, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(v, rv, rtol=1e-12, atol=1e-18)
    # The generic loop continues from the fused loop's state exactly as from its own.
    _generic(critic, opt, obs, returns, **_options(1, 50, seed=9))
    _generic(ref_critic, ref_opt, obs, returns, **_options(1, 50, seed=9))
    torch.testing.assert_close(_flat(critic), _flat(ref_critic), rtol=1e-12, atol=1e-14)


def test_fused_fit_float32_matches_the_generic_loop():
    critic, obs, returns = _problem(dtype=torch.float32)
    ref_critic = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(ref_critic.parameters(), lr=1e-3)
    ref = _generic(ref_critic, ref_opt, obs, returns, **_options(2, 64))
    got = fit_critic(critic, opt, obs, returns, **_options(2, 64))
    assert got.value_loss == pytest.approx(ref.value_loss, rel=1e-5)
    torch.testing.assert_close(_flat(critic), _flat(ref_critic), rtol=1e-5, atol=1e-6)


def test_fused_fit_reduces_the_loss_and_minibatch_larger_than_batch():
    critic, obs, returns = _problem()
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float((critic(obs) - returns).pow(2).mean())
    fit = fit_mlp_critic(critic, opt, obs, returns, epochs=40, minibatch_size=64)
    with torch.no_grad():
        after = float((critic(obs) - returns).pow(2).mean())
    assert fit is not None and fit.steps == 40 * 4
    assert after < 0.2 * before
    whole = fit_mlp_critic(critic, opt, obs[:10], returns[:10], epochs=3, minibatch_size=4096)
    assert whole is not None and whole.steps == 3


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
        assert fit_mlp_critic(critic, opt, obs, returns, epochs=1, minibatch_size=8) is None, name
    assert not supports_fast_fit(critic, plain, obs.float())  # dtype mismatch
    relu = _ReluCritic(_space(), (16, 16)).to(DT)
    assert not supports_fast_fit(relu, torch.optim.Adam(relu.parameters()), obs)
    # A Critic whose forward no longer is the tanh MLP (patched on the class) is caught by
    # the numerical guard on the first minibatch, and the generic loop runs instead.
    monkeypatch.setattr(Critic, "forward", lambda self, o: 2.0 * self._trunk(o).squeeze(-1))
    before = _flat(critic)
    assert fit_mlp_critic(critic, plain, obs, returns, epochs=1, minibatch_size=8) is None
    assert torch.equal(_flat(critic), before)  # declined before touching anything
    fit = fit_critic(critic, plain, obs, returns, epochs=1, minibatch_size=8)
    assert fit.steps == 26 and not torch.equal(_flat(critic), before)


# --------------------------------------------------------------------------- policy_step
ACTION_SPACES = {
    "categorical": gym.spaces.Discrete(4),
    "diag_gaussian": gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float64),
    "multi_categorical": gym.spaces.MultiDiscrete([3, 2]),
    "bernoulli": gym.spaces.MultiBinary(3),
}


def _policy_problem(family, seed=0):
    torch.manual_seed(seed)
    actor = make_actor(_space((3,)), ACTION_SPACES[family], (8,)).to(DT)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(seed + 1)
    obs = torch.rand(64, 3, generator=gen, dtype=DT) * 2 - 1
    with torch.no_grad():
        actions = sample(family, actor(obs), gen)
    adv = torch.randn(64, generator=gen, dtype=DT)
    return actor, PolicyBatch(obs=obs, actions=actions, advantages=adv)


def _step(actor, batch, **kwargs):
    result = policy_step(actor, batch, max_kl=0.01, cg_iters=8, cg_damping=0.1, **kwargs)
    return result, _flat(actor)


@pytest.mark.parametrize("family", list(ACTION_SPACES))
def test_policy_step_reusing_the_linearisation_equals_the_plain_step(family, monkeypatch):
    actor, batch = _policy_problem(family)
    ref_actor = copy.deepcopy(actor)
    got, theta = _step(actor, batch)

    # Reference: an operator without cached outputs / Jᵀ, so π_old and g are computed by
    # their own forward passes (flat_grad), as before the reuse.
    original = update_module.fisher_operator

    def plain(*args, **kwargs):
        op = original(*args, **kwargs)
        return LinearOperator(op.matvec, op.shape, op.dtype, op.device)

    monkeypatch.setattr(update_module, "fisher_operator", plain)
    ref, ref_theta = _step(ref_actor, batch)
    assert got.applied and ref.applied
    assert got.line_search_tries == ref.line_search_tries
    for field in ("kl", "surrogate_improvement", "expected_improvement", "grad_norm"):
        assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=1e-10), field
    torch.testing.assert_close(theta, ref_theta, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("family", list(ACTION_SPACES))
@pytest.mark.parametrize("max_kl", [0.01, 1e-9], ids=["accepted", "backtracked"])
def test_batched_line_search_path_equals_the_sequential_one(family, max_kl, monkeypatch):
    # The GPU path (all candidates in one vmapped pass, chosen on the device) forced on CPU.
    actor, batch = _policy_problem(family)
    ref_actor = copy.deepcopy(actor)
    kwargs = dict(max_kl=max_kl, cg_iters=8, cg_damping=0.1, line_search_max_tries=6)
    ref = policy_step(ref_actor, batch, **kwargs)
    monkeypatch.setattr(update_module, "line_search_batched", lambda device: True)
    got = policy_step(actor, batch, **kwargs)
    assert got.applied == ref.applied
    assert got.step_fraction == pytest.approx(ref.step_fraction, rel=1e-12)
    if ref.applied:
        assert got.line_search_tries == ref.line_search_tries
        assert got.kl == pytest.approx(ref.kl, rel=1e-9)
    torch.testing.assert_close(_flat(actor), _flat(ref_actor), rtol=1e-10, atol=1e-13)
