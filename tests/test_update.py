"""Tests for trpo.update: surrogate, mean KL, the trust-region policy step, critic fit.

References are independent of the code under test: the vanilla policy gradient by
``loss.backward()`` on the ``nn.Module`` (not ``torch.func``), the dense Hessian of the mean
KL by ``torch.func.hessian`` (not the matrix-free Fisher), KLs and log-probabilities by
``torch.distributions``, explained variance by numpy.
"""

from __future__ import annotations

import copy
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.distributions as D

import trpo.update as update_module
from natgrad.params import ParamSpace, flat_grad
from trpo.gae import compute_gae, normalize_advantages
from trpo.policy import Actor, make_actor, make_critic, sample
from trpo.rollout import collect_rollout, init_rollout_state, make_envs
from trpo.update import (
    PolicyBatch,
    explained_variance,
    fit_critic,
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
    # Unit advantages make L(θ_old) the mean probability ratio itself.
    ones = PolicyBatch(obs=obs, actions=actions, advantages=torch.ones_like(adv))
    assert float(surrogate(actor, params, ones, lp_old)) == pytest.approx(1.0, abs=1e-14)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    assert float(surrogate(actor, params, batch, lp_old)) == pytest.approx(
        float(adv.mean()), abs=1e-14
    )
    normalized = PolicyBatch(obs=obs, actions=actions, advantages=normalize_advantages(adv))
    assert abs(float(surrogate(actor, params, normalized, lp_old))) < 1e-14


@pytest.mark.parametrize("family", FAMILIES)
def test_surrogate_gradient_at_theta_old_is_the_vanilla_policy_gradient(family):
    actor, obs, actions, adv = _make_problem(family)
    params = _params(actor)
    with torch.no_grad():
        lp_old = _torch_log_prob(family, actor(obs), actions)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv)
    _, g = flat_grad(lambda p: surrogate(actor, p, batch, lp_old), params)

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
    step = policy_step(actor, batch, max_kl=0.01, cg_iters=10, cg_damping=0.1)
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
    assert float(mean_kl(actor, params, obs, dist_old)) == pytest.approx(0.0, abs=1e-15)
    # ... and at another θ it is the closed-form KL of torch.distributions (> 0).
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    kl = float(mean_kl(actor, other, obs, dist_old))
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
    policy_step(
        actor,
        PolicyBatch(obs=obs, actions=actions, advantages=adv),
        max_kl=0.01,
        cg_iters=5,
        cg_damping=0.1,
    )
    ((_, dense_fisher),) = captured

    hess = torch.func.hessian(lambda th: mean_kl(actor, space.unravel(th), obs, dist_old))(
        theta_old
    )
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
        max_kl=0.01,
        cg_iters=5,
        cg_damping=0.1,
        fvp_fraction=0.25,
        generator=torch.Generator().manual_seed(3),
    )
    ((fisher, dense_fisher),) = captured
    sub_logits = fisher.outputs
    assert sub_logits.shape == (5, 4)
    # Which states were used: match the operator's cached outputs to the batch's logits.
    idx = [int(torch.cdist(row[None], logits).argmin()) for row in sub_logits]
    assert len(set(idx)) == 5
    sub_obs = obs[idx]
    hess = torch.func.hessian(lambda th: mean_kl(actor, space.unravel(th), sub_obs, logits[idx]))(
        theta_old
    )
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
    result = policy_step(actor, batch, max_kl=max_kl, cg_iters=10, cg_damping=0.1)
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
    # Fixed-iteration CG runs 10 iterations, fewer only when ‖r‖ ≤ ε·‖g‖ froze it (natgrad.cg).
    frozen = result.cg_residual <= torch.finfo(batch.obs.dtype).eps * result.grad_norm
    assert result.cg_iterations == 10 or (result.cg_iterations < 10 and frozen)
    assert math.isfinite(result.cg_residual) and math.isfinite(result.entropy)


def test_real_update_rejected_by_the_line_search_leaves_parameters_bit_identical(real_problem):
    actor, batch = real_problem
    actor = copy.deepcopy(actor)
    before = _snapshot(actor)
    # Adversarial acceptance rule: a gain of a million times the linear prediction.
    result = policy_step(
        actor,
        batch,
        max_kl=0.01,
        cg_iters=10,
        cg_damping=0.1,
        line_search_max_tries=1,
        line_search_accept_ratio=1e6,
    )
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
    result = policy_step(actor, bad, max_kl=0.01, cg_iters=10, cg_damping=0.1)
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
# Critic fit and explained variance
# --------------------------------------------------------------------------------------------


def test_fit_critic_reduces_the_value_loss_on_a_fixed_regression_problem():
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(300, 3, generator=gen) * 2 - 1
    targets = 3.0 * obs[:, 0] - 2.0 * obs[:, 1] * obs[:, 2] + 1.0
    torch.manual_seed(0)
    critic = make_critic(OBS_SPACE.__class__(-1.0, 1.0, (3,), dtype=np.float32), (32, 32))
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    with torch.no_grad():
        loss_before = float((critic(obs) - targets).pow(2).mean())
    result = fit_critic(
        critic, opt, obs, targets, epochs=30, minibatch_size=64, generator=torch.Generator()
    )
    with torch.no_grad():
        loss_after = float((critic(obs) - targets).pow(2).mean())
    assert result.steps == 30 * math.ceil(300 / 64)
    assert loss_after < 0.05 * loss_before
    # The reported loss is the last epoch's running loss: close to the final loss.
    assert result.value_loss == pytest.approx(loss_after, rel=1.0, abs=0.05)
    assert result.value_loss < 0.1 * loss_before

    # A minibatch larger than the batch is clipped: one Adam step per epoch.
    small = fit_critic(critic, opt, obs[:10], targets[:10], epochs=3, minibatch_size=4096)
    assert small.steps == 3


def test_fit_critic_is_reproducible_with_the_same_generator():
    obs = torch.linspace(-1, 1, 64).reshape(32, 2)
    targets = obs.sum(-1)
    space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        critic = make_critic(space, (8,))
        opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
        fit_critic(
            critic,
            opt,
            obs,
            targets,
            epochs=3,
            minibatch_size=5,
            generator=torch.Generator().manual_seed(7),
        )
        runs.append(torch.cat([p.detach().flatten() for p in critic.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_explained_variance_matches_the_numpy_formula():
    rng = np.random.default_rng(0)
    returns = rng.normal(size=200)
    values = returns + 0.5 * rng.normal(size=200)
    expected = 1.0 - np.var(returns - values) / np.var(returns)
    got = explained_variance(torch.as_tensor(values), torch.as_tensor(returns))
    assert got == pytest.approx(expected, rel=1e-12)
    r = torch.as_tensor(returns)
    assert explained_variance(r.clone(), r) == 1.0
    assert explained_variance(torch.full_like(r, float(r.mean())), r) == pytest.approx(
        0.0, abs=1e-12
    )
    assert math.isnan(explained_variance(torch.zeros(5), torch.ones(5)))
