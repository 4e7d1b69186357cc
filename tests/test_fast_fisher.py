"""Tests for trpo.fast_fisher: the written-out Jacobian products of the TRPO actor.

Reference: natgrad's ``fisher_operator`` on ``actor.functional_dist_params`` (torch.func
products), densified in float64; ``tests/test_update.py`` also checks the operator policy_step
uses against ``torch.func.hessian`` of the mean KL.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from natgrad.curvature import fisher_operator
from trpo.fast_fisher import MLPDistFn, mlp_dist_fn
from trpo.policy import Actor, make_actor

DT = torch.float64
SPACES = {
    "categorical": gym.spaces.Discrete(4),
    "diag_gaussian": gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float64),
    "multi_categorical": gym.spaces.MultiDiscrete([3, 2]),
    "bernoulli": gym.spaces.MultiBinary(3),
}


def _actor(family, obs_shape=(3,), hidden=(5, 4), seed=0):
    torch.manual_seed(seed)
    space = gym.spaces.Box(-1.0, 1.0, obs_shape, dtype=np.float64)
    actor = make_actor(space, SPACES[family], hidden).to(DT)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    obs = torch.randn(9, *obs_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    return actor, {k: v.detach() for k, v in actor.named_parameters()}, obs


@pytest.mark.parametrize("obs_shape", [(3,), (2, 2)], ids=["flat", "2d"])
@pytest.mark.parametrize("family", list(SPACES))
def test_written_out_fisher_equals_torch_func(family, obs_shape):
    actor, params, obs = _actor(family, obs_shape)
    fast = mlp_dist_fn(actor, params, obs)
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
    # Jᵀu (the policy gradient's reverse pass) too, for a random cotangent.
    gen = torch.Generator().manual_seed(5)
    u = torch.utils._pytree.tree_map(
        lambda t: torch.randn(t.shape, generator=gen, dtype=DT), ref.outputs
    )
    torch.testing.assert_close(ours.vjp(u), ref.vjp(u), rtol=1e-12, atol=1e-14)


class _OwnForward(Actor):
    def forward(self, obs):
        return super().forward(obs)


class _OtherTrunk(Actor):
    def _trunk(self, obs):  # a different network behind the same forward
        return 2.0 * super()._trunk(obs)


def test_declines_what_it_does_not_reproduce():
    actor, params, obs = _actor("categorical")
    assert mlp_dist_fn(actor, params, obs) is not None
    subset = {k: v for k, v in params.items() if k != "layers.0.bias"}
    assert mlp_dist_fn(actor, subset, obs) is None
    assert mlp_dist_fn(actor, params, obs[:, :2]) is None  # wrong observation width
    space = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float64)
    own = _OwnForward(space, SPACES["categorical"], (5,)).to(DT)
    assert mlp_dist_fn(own, dict(own.named_parameters()), obs) is None
    # Same forward, other trunk: caught by the numerical guard (once per actor).
    other = _OtherTrunk(space, SPACES["categorical"], (5,)).to(DT)
    other_params = {k: v.detach() for k, v in other.named_parameters()}
    assert mlp_dist_fn(other, other_params, obs) is None
    assert mlp_dist_fn(other, other_params, obs) is None
