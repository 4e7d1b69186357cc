"""Tests for trpo.update: surrogate, mean KL, the trust-region policy step.

References are independent of the code under test: the vanilla policy gradient by
``loss.backward()`` on the ``nn.Module`` (not ``torch.func``), the dense Hessian of the mean
KL by ``torch.func.hessian`` (not the matrix-free Fisher), KLs and log-probabilities by
``torch.distributions``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.distributions as D

import trpo.update as update_module
from natgrad.distributed import Reducer
from natgrad.linop import LinearOperator
from natgrad.params import ParamSpace, flat_grad
from trpo.config import TRPOConfig
from trpo.gae import compute_gae, normalize_advantages
from trpo.policy import Actor, make_actor, make_critic, sample
from trpo.rollout import collect_rollout, init_rollout_state, make_envs
from trpo.update import (
    OldPolicy,
    PolicyBatch,
    PolicyStepSettings,
    mean_kl,
    policy_step,
    surrogate,
)

OBS_SPACE = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float64)
ACTION_SPACES = {
    "categorical": gym.spaces.Discrete(4),
    "diag_gaussian": gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float64),
    "multi_categorical": gym.spaces.MultiDiscrete([3, 2]),
    "bernoulli": gym.spaces.MultiBinary(3),
}
FAMILIES = list(ACTION_SPACES)


def _old(family: str, dist_old, log_prob_old=None) -> OldPolicy:
    """π_old for the formulas (the entropy is not used by them)."""
    return OldPolicy(family, dist_old, log_prob_old, torch.zeros(()))


def _params(actor: Actor) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in actor.named_parameters()}


def _snapshot(actor: Actor) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in actor.named_parameters()}


def _make_problem(family: str, *, batch: int = 32, hidden=(8,), seed: int = 0):
    """A float64 actor with non-trivial parameters and a batch sampled from it."""
    torch.manual_seed(seed)
    actor = make_actor(OBS_SPACE, ACTION_SPACES[family], hidden).double()
    with torch.no_grad():  # move off the near-uniform init so every term matters
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(seed + 1)
    obs = torch.rand(batch, 3, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        actions = sample(family, actor(obs), gen)
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    return actor, obs, actions, advantages


def _detached(dist_params):
    # The Gaussian's log_std is the parameter itself, even under no_grad: copy it, so that
    # a step policy_step writes into the actor does not change π_old.
    if isinstance(dist_params, (list, tuple)):
        return type(dist_params)(d.detach().clone() for d in dist_params)
    return dist_params.detach().clone()


def _torch_dist(family: str, dist_params) -> D.Distribution:
    """The same policy as a torch.distributions object (event over the action dims)."""
    if family == "categorical":
        return D.Categorical(logits=dist_params)
    if family == "diag_gaussian":
        mean, log_std = dist_params
        return D.Independent(D.Normal(mean, log_std.exp().expand_as(mean)), 1)
    if family == "bernoulli":
        return D.Independent(D.Bernoulli(logits=dist_params), 1)
    raise ValueError(family)


def _torch_log_prob(family: str, dist_params, actions: torch.Tensor) -> torch.Tensor:
    if family == "multi_categorical":
        return sum(
            D.Categorical(logits=lg).log_prob(actions[..., i]) for i, lg in enumerate(dist_params)
        )
    return _torch_dist(family, dist_params).log_prob(actions)


def _torch_kl(family: str, old, new) -> torch.Tensor:
    if family == "multi_categorical":
        return sum(
            D.kl_divergence(D.Categorical(logits=o), D.Categorical(logits=n))
            for o, n in zip(old, new)
        )
    return D.kl_divergence(_torch_dist(family, old), _torch_dist(family, new))


def _spy_on_fisher(monkeypatch) -> list:
    """Record ``(operator, dense matrix)`` for every ``trpo.update.fisher_operator`` call.

    The dense matrix is taken when the operator is built, at θ_old: the operator's
    parameters are views of the actor's, which an accepted step later overwrites.
    """
    original = update_module.fisher_operator
    captured: list = []

    def spy(*args, **kwargs):
        op = original(*args, **kwargs)
        captured.append((op, op.to_dense()))
        return op

    monkeypatch.setattr(update_module, "fisher_operator", spy)
    return captured


# --------------------------------------------------------------------------------------------
# At θ = θ_old: ratio 1, L = mean Â, ∇L = vanilla policy gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_surrogate_at_theta_old_is_mean_advantage_with_unit_ratio(family):
    actor, obs, actions, adv = _make_problem(family)
    params = _params(actor)
    with torch.no_grad():
        lp_old = _torch_log_prob(family, actor(obs), actions)
    old = _old(family, None, lp_old)
    dist = actor.functional_dist_params(params, obs)
    # Unit advantages make L(θ_old) the mean probability ratio itself.
    ones = PolicyBatch(obs=obs, actions=actions, advantages=torch.ones_like(adv))
    assert float(surrogate(dist, ones, old)) == pytest.approx(1.0, abs=1e-14)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    assert float(surrogate(dist, batch, old)) == pytest.approx(float(adv.mean()), abs=1e-14)
    normalized = PolicyBatch(obs=obs, actions=actions, advantages=normalize_advantages(adv))
    assert abs(float(surrogate(dist, normalized, old))) < 1e-14


@pytest.mark.parametrize("family", FAMILIES)
def test_surrogate_gradient_at_theta_old_is_the_vanilla_policy_gradient(family):
    actor, obs, actions, adv = _make_problem(family)
    params = _params(actor)
    with torch.no_grad():
        lp_old = _torch_log_prob(family, actor(obs), actions)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    old = _old(family, None, lp_old)
    _, g = flat_grad(lambda p: surrogate(actor.functional_dist_params(p, obs), batch, old), params)

    # Reference: ∇ mean(log π(a|s) · Â) by backward() through the nn.Module.
    actor.zero_grad(set_to_none=True)
    (_torch_log_prob(family, actor(obs), actions) * adv).mean().backward()
    reference = {name: p.grad for name, p in actor.named_parameters()}

    got = ParamSpace(params).unravel(g)
    for name, ref in reference.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=1e-12, msg=name)
    assert float(g.norm()) > 1e-3  # a non-trivial gradient

    # policy_step differentiates the same surrogate: its ‖g‖ is the reference's.
    ref_norm = math.sqrt(sum(float(r.pow(2).sum()) for r in reference.values()))
    step = policy_step(actor, batch, PolicyStepSettings(max_kl=0.01, cg_iters=10))
    assert step.grad_norm == pytest.approx(ref_norm, rel=1e-10)


# --------------------------------------------------------------------------------------------
# KL(π_old‖π_old) = 0, and its Hessian is the Fisher policy_step uses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_kl_of_the_old_policy_to_itself_is_zero(family):
    actor, obs, _, _ = _make_problem(family)
    params = _params(actor)
    with torch.no_grad():
        dist_old = _detached(actor(obs))
    old = _old(family, dist_old)
    with torch.no_grad():
        assert float(mean_kl(actor(obs), old)) == pytest.approx(0.0, abs=1e-15)
    # ... and at another θ it is the closed-form KL of torch.distributions (> 0).
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    kl = float(mean_kl(actor.functional_dist_params(other, obs), old))
    with torch.no_grad():
        ref = float(_torch_kl(family, dist_old, actor.functional_dist_params(other, obs)).mean())
    assert kl > 0
    assert kl == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_kl_hessian_at_theta_old_is_the_fisher_of_policy_step(family, monkeypatch):
    actor, obs, actions, adv = _make_problem(family, batch=12, hidden=(4,))
    params = _params(actor)
    space = ParamSpace(params)
    theta_old = space.ravel(params)
    with torch.no_grad():
        dist_old = _detached(actor(obs))

    captured = _spy_on_fisher(monkeypatch)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    policy_step(actor, batch, PolicyStepSettings(max_kl=0.01, cg_iters=5))
    ((_, dense_fisher),) = captured

    old = _old(family, dist_old)
    hess = torch.func.hessian(
        lambda th: mean_kl(actor.functional_dist_params(space.unravel(th), obs), old)
    )(theta_old)
    assert hess.shape == (space.numel, space.numel)
    assert float(hess.abs().max()) > 1e-3
    torch.testing.assert_close(dense_fisher, hess, rtol=1e-9, atol=1e-12)


def test_fvp_fraction_builds_the_fisher_on_a_subset_of_the_states(monkeypatch):
    family = "categorical"
    actor, obs, actions, adv = _make_problem(family, batch=20, hidden=(4,))
    params = _params(actor)
    space = ParamSpace(params)
    theta_old = space.ravel(params)  # a copy: the step below overwrites the actor
    with torch.no_grad():
        logits = actor(obs)
    captured = _spy_on_fisher(monkeypatch)
    policy_step(
        actor,
        PolicyBatch(obs=obs, actions=actions, advantages=adv),
        PolicyStepSettings(max_kl=0.01, cg_iters=5, fvp_fraction=0.25),
        generator=torch.Generator().manual_seed(3),
    )
    ((fisher, dense_fisher),) = captured
    sub_logits = fisher.outputs
    assert sub_logits.shape == (5, 4)
    # Which states were used: match the operator's cached outputs to the batch's logits.
    idx = [int(torch.cdist(row[None], logits).argmin()) for row in sub_logits]
    assert len(set(idx)) == 5
    sub_obs = obs[idx]
    old = _old(family, logits[idx])
    hess = torch.func.hessian(
        lambda th: mean_kl(actor.functional_dist_params(space.unravel(th), sub_obs), old)
    )(theta_old)
    torch.testing.assert_close(dense_fisher, hess, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# A real update: CartPole and Pendulum rollouts
# --------------------------------------------------------------------------------------------


def _real_batch(env_id: str, dtype: torch.dtype, *, n_envs: int = 2, n_steps: int = 256):
    torch.manual_seed(0)
    envs = make_envs(env_id, n_envs)
    try:
        actor = make_actor(envs.single_observation_space, envs.single_action_space).to(dtype)
        critic = make_critic(envs.single_observation_space).to(dtype)
        state = init_rollout_state(envs, seed=0)
        rollout = collect_rollout(
            envs,
            actor,
            critic,
            n_steps,
            state=state,
            generator=torch.Generator().manual_seed(0),
            dtype=dtype,
        )
    finally:
        envs.close()
    adv, _ = compute_gae(
        rollout.rewards,
        rollout.values,
        rollout.next_values,
        rollout.terminations,
        rollout.truncations,
        0.99,
        0.95,
    )
    B = rollout.batch_size
    batch = PolicyBatch(
        obs=rollout.obs.reshape(B, -1),
        actions=rollout.actions.reshape(B, *rollout.actions.shape[2:]),
        advantages=normalize_advantages(adv.reshape(-1)),
    )
    return actor, batch


@pytest.fixture(
    scope="module",
    params=[("CartPole-v1", torch.float32), ("Pendulum-v1", torch.float64)],
    ids=["CartPole-float32", "Pendulum-float64"],
)
def real_problem(request):
    env_id, dtype = request.param
    return _real_batch(env_id, dtype)


def test_real_update_keeps_kl_within_max_kl_and_improves_the_surrogate(real_problem):
    actor, batch = real_problem
    actor = copy.deepcopy(actor)
    old = copy.deepcopy(actor)
    max_kl = 0.01
    result = policy_step(actor, batch, PolicyStepSettings(max_kl=max_kl, cg_iters=10))
    assert result.applied
    assert result.status == "OK"
    assert 0 < result.step_fraction <= 1

    family = actor.family
    with torch.no_grad():
        d_old, d_new = old(batch.obs), actor(batch.obs)
        kl = float(_torch_kl(family, d_old, d_new).double().mean())
        lp_old = _torch_log_prob(family, d_old, batch.actions)
        lp_new = _torch_log_prob(family, d_new, batch.actions)
        gain = float(((lp_new - lp_old).exp() * batch.advantages).double().mean())
    eps = 1e-5 if batch.obs.dtype == torch.float32 else 1e-12
    assert 0 < kl <= max_kl * (1 + eps)
    assert result.kl == pytest.approx(kl, rel=1e-3 if eps > 1e-6 else 1e-9)
    assert gain > 0
    assert result.surrogate_improvement == pytest.approx(gain, rel=1e-3 if eps > 1e-6 else 1e-9)
    # The step taken is the one reported.
    step_norm = math.sqrt(
        sum(
            float((p - q).detach().double().pow(2).sum())
            for p, q in zip(actor.parameters(), old.parameters())
        )
    )
    assert result.step_norm == pytest.approx(step_norm, rel=1e-4)
    # Fixed-iteration CG runs 10 iterations, fewer only when ‖r‖ ≤ ε·‖g‖ froze it (natgrad.cg);
    # cg_residual is already relative, ‖r‖/‖g‖.
    frozen = result.cg_residual <= torch.finfo(batch.obs.dtype).eps
    assert result.cg_iterations == 10 or (result.cg_iterations < 10 and frozen)
    assert math.isfinite(result.cg_residual) and math.isfinite(result.entropy)


def test_real_update_rejected_by_the_line_search_leaves_parameters_bit_identical(real_problem):
    actor, batch = real_problem
    actor = copy.deepcopy(actor)
    before = _snapshot(actor)
    # Adversarial acceptance rule: a gain of a million times the linear prediction.
    settings = PolicyStepSettings(
        max_kl=0.01, cg_iters=10, line_search_max_tries=1, line_search_accept_ratio=1e6
    )
    result = policy_step(actor, batch, settings)
    assert result.status == "OK" and result.expected_improvement > 0
    assert not result.applied
    assert result.line_search_tries == 1
    assert (result.kl, result.step_fraction, result.step_norm) == (0.0, 0.0, 0.0)
    assert result.surrogate_improvement == 0.0
    for name, p in actor.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("what", ["zero", "nan"])
def test_zero_or_nan_advantages_apply_nothing_and_report_no_nan(real_problem, what):
    actor, batch = real_problem
    actor = copy.deepcopy(actor)
    before = _snapshot(actor)
    fill = 0.0 if what == "zero" else math.nan
    bad = PolicyBatch(
        obs=batch.obs, actions=batch.actions, advantages=torch.full_like(batch.advantages, fill)
    )
    result = policy_step(actor, bad, PolicyStepSettings(max_kl=0.01, cg_iters=10))
    assert not result.applied
    assert result.status == ("ZERO_GRADIENT" if what == "zero" else "NON_FINITE")
    for name, p in actor.named_parameters():
        assert torch.equal(p, before[name]), name
    assert (result.kl, result.step_fraction, result.step_norm) == (0.0, 0.0, 0.0)
    if what == "zero":
        for field in ("expected_improvement", "grad_norm", "cg_residual", "entropy"):
            assert math.isfinite(getattr(result, field)), field
        assert result.grad_norm == 0.0 and result.expected_improvement == 0.0


# --------------------------------------------------------------------------------------------
# The step's structure: settings, named formulas, injected reduction, fast paths
# --------------------------------------------------------------------------------------------


def test_settings_validate_and_read_a_config():
    with pytest.raises(ValueError, match="max_kl"):
        PolicyStepSettings(max_kl=0.0)
    with pytest.raises(ValueError, match="fvp_fraction"):
        PolicyStepSettings(fvp_fraction=1.5)
    with pytest.raises(ValueError, match="cg_iters"):
        PolicyStepSettings(cg_iters=2.5)
    with pytest.raises(ValueError, match="line_search_shrink"):
        PolicyStepSettings(line_search_shrink=math.nan)
    config = TRPOConfig(max_kl=0.02, cg_iters=7, line_search_max_tries=4, cuda_graph=True)
    settings = PolicyStepSettings.from_config(config)
    assert (settings.max_kl, settings.cg_iters, settings.line_search_max_tries) == (0.02, 7, 4)
    assert settings.cuda_graph and settings.cg_damping == config.cg_damping


def test_deprecated_keywords_warn_and_take_the_same_step():
    actor, obs, actions, adv = _make_problem("diag_gaussian")
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    ref = copy.deepcopy(actor)
    want = policy_step(ref, batch, PolicyStepSettings(max_kl=0.02, cg_iters=6))
    with pytest.warns(DeprecationWarning, match="PolicyStepSettings"):
        got = policy_step(actor, batch, max_kl=0.02, cg_iters=6, cg_damping=0.1)
    assert got == want
    assert all(torch.equal(p, q) for p, q in zip(actor.parameters(), ref.parameters()))
    with pytest.raises(TypeError, match="settings"):
        policy_step(actor, batch)


@dataclasses.dataclass(frozen=True)
class _CountingReducer(Reducer):
    """The identity, recording which reductions the step asks for."""

    calls: list = dataclasses.field(default_factory=list)

    def weight(self, n_local):
        self.calls.append(("weight", n_local))
        return 1.0

    def mean(self, x, weight):
        self.calls.append(("mean", tuple(x.shape)))
        return x

    def operator(self, op, weight):
        self.calls.append(("operator", weight))
        return op


@pytest.mark.parametrize("family", ["categorical", "diag_gaussian"])
def test_every_mean_goes_through_the_reducer_and_the_named_formulas(family, monkeypatch):
    actor, obs, actions, adv = _make_problem(family)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    settings = PolicyStepSettings(max_kl=1e-6, cg_iters=5, line_search_max_tries=3)
    ref = copy.deepcopy(actor)
    want = policy_step(ref, batch, settings)
    # The running code calls the exported formulas (counted here), not private copies.
    counts = {"surrogate": 0, "mean_kl": 0}
    for name in counts:
        real = getattr(update_module, name)

        def counted(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(update_module, name, counted)
    reducer = _CountingReducer()
    got = policy_step(actor, batch, settings, reducer=reducer)
    assert got == want  # the identity reduction changes nothing
    n = sum(p.numel() for p in actor.parameters())
    tries = got.line_search_tries
    assert reducer.calls == [
        ("weight", 32),
        ("mean", (n + 2,)),  # g, L(θ_old) and the entropy: one reduction
        ("operator", 1.0),  # every Fisher-vector product
        *[("mean", (2,))] * tries,  # L and KL of each line-search candidate
    ]
    # L: once for g at θ_old, then with the KL once per candidate.
    assert counts == {"surrogate": 1 + tries, "mean_kl": tries}


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_step_reusing_the_linearisation_equals_the_plain_step(family, monkeypatch):
    actor, obs, actions, adv = _make_problem(family, batch=64, hidden=(8,))
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    settings = PolicyStepSettings(max_kl=0.01, cg_iters=8)
    ref_actor = copy.deepcopy(actor)
    got = policy_step(actor, batch, settings)

    # Reference: an operator without cached outputs / Jᵀ, so π_old and g are computed by
    # their own forward passes (flat_grad).
    original = update_module.fisher_operator

    def plain(*args, **kwargs):
        op = original(*args, **kwargs)
        return LinearOperator(op.matvec, op.shape, op.dtype, op.device)

    monkeypatch.setattr(update_module, "fisher_operator", plain)
    ref = policy_step(ref_actor, batch, settings)
    assert got.applied and ref.applied
    assert got.line_search_tries == ref.line_search_tries
    for field in ("kl", "surrogate_improvement", "expected_improvement", "grad_norm"):
        assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=1e-10), field
    torch.testing.assert_close(_flat(actor), _flat(ref_actor), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_kl", [0.01, 1e-9], ids=["accepted", "backtracked"])
def test_batched_line_search_path_equals_the_sequential_one(family, max_kl, monkeypatch):
    # The GPU path (all candidates in one vmapped pass, chosen on the device) forced on CPU.
    actor, obs, actions, adv = _make_problem(family, batch=64, hidden=(8,))
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    ref_actor = copy.deepcopy(actor)
    settings = PolicyStepSettings(max_kl=max_kl, cg_iters=8, line_search_max_tries=6)
    ref = policy_step(ref_actor, batch, settings)
    monkeypatch.setattr(update_module, "line_search_batched", lambda device: True)
    got = policy_step(actor, batch, settings)
    assert got.applied == ref.applied
    assert got.step_fraction == pytest.approx(ref.step_fraction, rel=1e-12)
    if ref.applied:
        assert got.line_search_tries == ref.line_search_tries
        assert got.kl == pytest.approx(ref.kl, rel=1e-9)
    torch.testing.assert_close(_flat(actor), _flat(ref_actor), rtol=1e-10, atol=1e-13)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])
