"""Tests for natgrad.families (distributions against torch.distributions, float64) and
trpo.policy (the actor and critic networks)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import distributions as D

from natgrad.curvature import fisher_operator
from natgrad.families import (
    FAMILIES,
    draw_noise,
    entropy,
    kl_divergence,
    log_prob,
    mode,
    sample,
    sample_from_noise,
)
from natgrad.mlp import MLPDistFn
from natgrad.params import ParamSpace
from trpo.policy import Actor, Critic, make_actor, make_critic

B = 7
OBS_SPACE = gym.spaces.Box(-1.0, 1.0, shape=(5,), dtype=np.float32)
ACTION_SPACES = {
    "categorical": gym.spaces.Discrete(4),
    "diag_gaussian": gym.spaces.Box(-2.0, 2.0, shape=(3,), dtype=np.float32),
    "multi_categorical": gym.spaces.MultiDiscrete([3, 2, 5]),
    "bernoulli": gym.spaces.MultiBinary(4),
}


def _random_params(family: str, gen: torch.Generator, batch=(B,)):
    """Random distribution parameters in float64 (including large logits)."""

    def r(*shape):
        return 3.0 * torch.randn(*batch, *shape, generator=gen, dtype=torch.float64)

    if family == "categorical":
        return r(4)
    if family == "diag_gaussian":
        return r(3), 0.5 * torch.randn(3, generator=gen, dtype=torch.float64)
    if family == "multi_categorical":
        return [r(3), r(2), r(5)]
    return r(4)


def _reference(family: str, params) -> D.Distribution:
    if family == "categorical":
        return D.Categorical(logits=params)
    if family == "diag_gaussian":
        mean, log_std = params
        return D.Independent(D.Normal(mean, log_std.exp().expand_as(mean)), 1)
    if family == "bernoulli":
        return D.Independent(D.Bernoulli(logits=params), 1)
    raise AssertionError(family)


def _ref_log_prob(family, params, actions):
    if family == "multi_categorical":
        return sum(
            D.Categorical(logits=lg).log_prob(actions[..., i]) for i, lg in enumerate(params)
        )
    return _reference(family, params).log_prob(actions)


def _ref_entropy(family, params):
    if family == "multi_categorical":
        return sum(D.Categorical(logits=lg).entropy() for lg in params)
    return _reference(family, params).entropy()


def _ref_kl(family, p, q):
    if family == "multi_categorical":
        return sum(
            D.kl_divergence(D.Categorical(logits=a), D.Categorical(logits=b)) for a, b in zip(p, q)
        )
    return D.kl_divergence(_reference(family, p), _reference(family, q))


@pytest.mark.parametrize("family", FAMILIES)
def test_log_prob_entropy_kl_match_torch_distributions(family):
    gen = torch.Generator().manual_seed(0)
    p = _random_params(family, gen)
    q = _random_params(family, gen)
    actions = sample(family, p, gen)
    torch.testing.assert_close(log_prob(family, p, actions), _ref_log_prob(family, p, actions))
    torch.testing.assert_close(entropy(family, p), _ref_entropy(family, p))
    torch.testing.assert_close(kl_divergence(family, p, q), _ref_kl(family, p, q))
    assert log_prob(family, p, actions).shape == (B,)
    assert entropy(family, p).shape == (B,)
    assert kl_divergence(family, p, q).shape == (B,)
    assert (kl_divergence(family, p, q) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_functions_accept_extra_batch_dims(family):
    gen = torch.Generator().manual_seed(1)
    p = _random_params(family, gen, batch=(3, 2))
    q = _random_params(family, gen, batch=(3, 2))
    a = sample(family, p, gen)
    assert log_prob(family, p, a).shape == (3, 2)
    assert entropy(family, p).shape == (3, 2)
    assert kl_divergence(family, p, q).shape == (3, 2)
    torch.testing.assert_close(log_prob(family, p, a), _ref_log_prob(family, p, a))


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_of_actor_with_itself_is_zero(family):
    actor = make_actor(OBS_SPACE, ACTION_SPACES[family]).double()
    # Perturb so that the distribution is far from uniform / unit variance.
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    obs = torch.randn(B, 5, dtype=torch.float64)
    params = actor(obs)
    kl = kl_divergence(family, params, params)
    assert kl.shape == (B,)
    assert torch.equal(kl, torch.zeros_like(kl)) or kl.abs().max() < 1e-14


def test_categorical_with_masked_logit_is_finite():
    logits = torch.tensor([[0.0, -math.inf, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        entropy("categorical", logits), D.Categorical(logits=logits).entropy()
    )
    kl = kl_divergence("categorical", logits, logits)
    assert torch.isfinite(kl).all() and kl.abs().max() < 1e-15


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_follows_the_distribution(family):
    """Empirical moments of 40k samples from one state agree with the distribution."""
    gen = torch.Generator().manual_seed(3)
    p = _random_params(family, gen, batch=(1,))
    if family != "diag_gaussian":  # moderate logits so every outcome is visited
        p = [x / 3 for x in p] if family == "multi_categorical" else p / 3
    n = 40_000
    noise = draw_noise(family, p, gen, batch_shape=(n,))
    a = sample_from_noise(family, p, noise)[:, 0].double()  # (n, ...)
    if family == "categorical":
        freq = torch.bincount(a.long(), minlength=4).double() / n
        torch.testing.assert_close(freq, torch.softmax(p[0], -1), atol=0.01, rtol=0)
    elif family == "diag_gaussian":
        mean, log_std = p
        torch.testing.assert_close(a.mean(0), mean[0], atol=0.05, rtol=0)
        torch.testing.assert_close(a.std(0), log_std.exp(), atol=0.03, rtol=0)
    elif family == "multi_categorical":
        for i, lg in enumerate(p):
            freq = torch.bincount(a[:, i].long(), minlength=lg.shape[-1]).double() / n
            torch.testing.assert_close(freq, torch.softmax(lg[0], -1), atol=0.01, rtol=0)
    else:
        torch.testing.assert_close(a.mean(0), torch.sigmoid(p[0]), atol=0.01, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_reproducible_and_mode_is_deterministic(family):
    p = _random_params(family, torch.Generator().manual_seed(4))
    a1 = sample(family, p, torch.Generator().manual_seed(5))
    a2 = sample(family, p, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)
    m = mode(family, p)
    assert m.shape == a1.shape and m.dtype == a1.dtype
    if family == "categorical":
        assert torch.equal(m, p.argmax(-1))
    elif family == "diag_gaussian":
        assert torch.equal(m, p[0])
    elif family == "bernoulli":
        assert torch.equal(m, (torch.sigmoid(p) > 0.5).double())


@pytest.mark.parametrize("family", FAMILIES)
def test_actor_outputs_match_the_family(family):
    space = ACTION_SPACES[family]
    actor = make_actor(OBS_SPACE, space, hidden_sizes=(16, 8))
    assert actor.family == family
    obs = torch.randn(B, 5)
    out = actor(obs)
    if family == "categorical":
        assert out.shape == (B, 4)
    elif family == "diag_gaussian":
        mean, log_std = out
        assert mean.shape == (B, 3) and log_std.shape == (3,)
        assert torch.equal(log_std, torch.zeros(3))
        assert log_std is actor.log_std
    elif family == "multi_categorical":
        assert [t.shape for t in out] == [(B, 3), (B, 2), (B, 5)]
    else:
        assert out.shape == (B, 4)
    # functional_dist_params with the module's own params reproduces forward, and
    # with other params follows them.
    params = {k: v.detach().clone() for k, v in actor.named_parameters()}
    same = actor.functional_dist_params(params, obs)
    torch.testing.assert_close(same, out)
    params = {k: v + 1.0 for k, v in params.items()}
    other = actor.functional_dist_params(params, obs)
    assert not torch.allclose(_flat(other), _flat(out))


def _flat(dist_params) -> torch.Tensor:
    parts = dist_params if isinstance(dist_params, (list, tuple)) else [dist_params]
    return torch.cat([t.flatten() for t in parts])


def test_orthogonal_init_gains():
    actor = make_actor(OBS_SPACE, ACTION_SPACES["categorical"], hidden_sizes=(64, 64))
    critic = make_critic(OBS_SPACE, hidden_sizes=(64, 64))
    w0, w1, w2 = (layer.weight.detach().double() for layer in actor.layers)
    close = dict(atol=1e-5, rtol=1e-5)  # the weights are float32
    # W (out, in) with out > in: columns orthonormal·gain -> WᵀW = gain² I.
    torch.testing.assert_close(w0.T @ w0, 2.0 * torch.eye(5, dtype=torch.float64), **close)
    torch.testing.assert_close(w1 @ w1.T, 2.0 * torch.eye(64, dtype=torch.float64), **close)
    torch.testing.assert_close(w2 @ w2.T, 0.01**2 * torch.eye(4, dtype=torch.float64), **close)
    c_last = critic.layers[-1].weight.detach().double()
    torch.testing.assert_close(c_last @ c_last.T, torch.ones(1, 1, dtype=torch.float64), **close)
    for layer in [*actor.layers, *critic.layers]:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_critic_shape_and_multidim_observations():
    space = gym.spaces.Box(0, 255, shape=(2, 3), dtype=np.uint8)
    critic = make_critic(space, hidden_sizes=(8,))
    assert critic(torch.rand(4, 6, 2, 3)).shape == (4, 6)
    actor = make_actor(space, ACTION_SPACES["categorical"], hidden_sizes=(8,))
    obs = torch.rand(4, 2, 3)
    # The first layer sees the row-major flattening of each observation.
    first = actor.layers[0]
    h = torch.tanh(obs.reshape(4, 6) @ first.weight.T + first.bias)
    expected = actor.layers[1](h)
    torch.testing.assert_close(actor(obs), expected)
    assert isinstance(critic, Critic) and isinstance(actor, Actor)


@pytest.mark.parametrize(
    "obs_space, act_space, match",
    [
        (gym.spaces.Dict({"a": OBS_SPACE}), ACTION_SPACES["categorical"], "Dict"),
        (gym.spaces.Tuple((OBS_SPACE,)), ACTION_SPACES["categorical"], "Tuple"),
        (gym.spaces.Text(5), ACTION_SPACES["categorical"], "Text"),
        (gym.spaces.Discrete(3), ACTION_SPACES["categorical"], "Discrete"),
        (OBS_SPACE, gym.spaces.Tuple((gym.spaces.Discrete(2),)), "Tuple"),
        (OBS_SPACE, gym.spaces.Box(-1, 1, shape=(2, 2)), "Box"),
        (OBS_SPACE, gym.spaces.Text(3), "Text"),
    ],
)
def test_unsupported_spaces_name_the_space(obs_space, act_space, match):
    with pytest.raises(ValueError, match=match):
        make_actor(obs_space, act_space)


def test_bad_hidden_sizes_and_family():
    with pytest.raises(ValueError, match="hidden_sizes"):
        make_critic(OBS_SPACE, hidden_sizes=(64, 0))
    with pytest.raises(ValueError, match="family"):
        entropy("gaussian", torch.zeros(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_fn_matches_forward_and_follows_in_place_updates(family):
    actor = make_actor(OBS_SPACE, ACTION_SPACES[family], hidden_sizes=(16, 8))
    fn = actor.inference_fn()
    obs = torch.randn(B, 5)
    torch.testing.assert_close(fn(obs), actor(obs), rtol=0, atol=0)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.5)
    torch.testing.assert_close(fn(obs), actor(obs), rtol=0, atol=0)
    space = gym.spaces.Box(-1, 1, shape=(2, 3), dtype=np.float32)
    actor2 = make_actor(space, ACTION_SPACES[family], hidden_sizes=(4,))
    obs2 = torch.randn(3, 2, 3)
    torch.testing.assert_close(actor2.inference_fn()(obs2), actor2(obs2), rtol=0, atol=0)


# torch.func.hessian's forward-mode AD loads decompositions via torch.jit.script (torch internals).
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_operator_on_the_actor_is_the_hessian_of_the_mean_kl(family):
    """natgrad's Fisher of ``actor.functional_dist_params`` equals the dense Hessian of the
    mean of this module's closed-form KL at θ = θ_old (interface check between the two)."""
    torch.manual_seed(0)
    actor = make_actor(OBS_SPACE, ACTION_SPACES[family], hidden_sizes=(4,)).double()
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = {k: v.detach() for k, v in actor.named_parameters()}
    obs = torch.randn(6, 5, dtype=torch.float64)
    fisher = fisher_operator(actor.functional_dist_params, params, obs, family=actor.family)
    space = ParamSpace(params)
    with torch.no_grad():
        old = actor(obs)

    def mean_kl(theta):
        new = actor.functional_dist_params(space.unravel(theta), obs)
        return kl_divergence(family, old, new).mean()

    dense = torch.func.hessian(mean_kl)(space.ravel(params))
    torch.testing.assert_close(fisher.to_dense(), dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_inference_fn_matches_forward(family):
    for space, shape in ((OBS_SPACE, (5,)), (gym.spaces.Box(-1, 1, shape=(2, 3)), (2, 3))):
        actor = make_actor(space, ACTION_SPACES[family], hidden_sizes=(16, 8)).double()
        obs = torch.randn(B, *shape, dtype=torch.float64)
        out = actor.numpy_inference_fn()(obs.numpy())
        ref = actor(obs)
        if family == "diag_gaussian":
            np.testing.assert_allclose(out[0], ref[0].detach().numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(out[1], ref[1].detach().numpy())
        elif family == "multi_categorical":
            assert len(out) == len(ref)
            for o, r in zip(out, ref):
                np.testing.assert_allclose(o, r.detach().numpy(), rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ written-out Jacobian products
def _perturbed_actor(family, obs_shape=(3,), hidden=(5, 4), seed=0, cls=Actor):
    torch.manual_seed(seed)
    space = gym.spaces.Box(-1.0, 1.0, obs_shape, dtype=np.float64)
    actor = cls(space, ACTION_SPACES[family], hidden).double()
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(9, *obs_shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    return actor, {k: v.detach() for k, v in actor.named_parameters()}, obs


@pytest.mark.parametrize("obs_shape", [(3,), (2, 2)], ids=["flat", "2d"])
@pytest.mark.parametrize("family", FAMILIES)
def test_written_out_fisher_of_the_actor_equals_torch_func(family, obs_shape):
    """The actor's natgrad.mlp products against natgrad's torch.func products (float64)."""
    actor, params, obs = _perturbed_actor(family, obs_shape)
    fast = actor.written_out_dist_fn(params, obs)
    assert isinstance(fast, MLPDistFn)
    ours = fisher_operator(fast, params, obs, family=family, linearization="custom")
    ref = fisher_operator(actor.functional_dist_params, params, obs, family=family)
    dense = ref.to_dense()
    assert float(dense.abs().max()) > 1e-3
    torch.testing.assert_close(ours.to_dense(), dense, rtol=1e-12, atol=1e-14)
    for a, b in zip(
        torch.utils._pytree.tree_leaves(ours.outputs), torch.utils._pytree.tree_leaves(ref.outputs)
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(5)
    u = torch.utils._pytree.tree_map(
        lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64), ref.outputs
    )
    torch.testing.assert_close(ours.vjp(u), ref.vjp(u), rtol=1e-12, atol=1e-14)


class _OwnForward(Actor):
    def forward(self, obs):
        return super().forward(obs)


class _OtherTrunk(Actor):
    def _trunk(self, obs):  # a different network behind the same forward
        return 2.0 * super()._trunk(obs)


def test_written_out_products_decline_what_they_do_not_reproduce():
    actor, params, obs = _perturbed_actor("categorical")
    assert actor.written_out_dist_fn(params, obs) is not None
    subset = {k: v for k, v in params.items() if k != "layers.0.bias"}
    assert actor.written_out_dist_fn(subset, obs) is None
    assert actor.written_out_dist_fn(params, obs[:, :2]) is None  # wrong observation width
    own, own_params, _ = _perturbed_actor("categorical", cls=_OwnForward)
    assert own.written_out_dist_fn(own_params, obs) is None
    # Same forward, other trunk: caught by the numerical guard (once per actor).
    other, other_params, _ = _perturbed_actor("categorical", cls=_OtherTrunk)
    assert other.written_out_dist_fn(other_params, obs) is None
    assert other.written_out_dist_fn(other_params, obs) is None
