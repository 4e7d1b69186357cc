"""Tests of trpo.memory: the rollout/update memory estimate and the budget check."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

from trpo.config import TRPOConfig
from trpo.memory import (
    MemoryBudgetError,
    available_memory_bytes,
    check_memory,
    estimate_rollout_bytes,
    mlp_parameter_count,
)
from trpo.policy import make_actor, make_critic


def test_estimate_rollout_bytes_by_hand():
    cfg = TRPOConfig(n_envs=2, n_steps=10, hidden_sizes=(3,), dtype="float64", fvp_fraction=0.5)
    # B = 20, B_f = 10, b = 8, W_a = 4 + 3 + 2 = 9, W_c = 4 + 3 + 1 = 8
    rollout = 20 * (2 * 4 + 3 * 2 + 8) * 8  # 3520
    update = (2 * 20 * 9 + 4 * 10 * 9 + 2 * 20 * 8) * 8  # 8320
    # P_a = 5·3 + 4·2 + 2 (log σ) = 25, P_c = 5·3 + 4·1 = 19
    params = (9 * 25 + 7 * 19) * 8  # 2864
    total = 1.5 * (rollout + update + params)
    assert estimate_rollout_bytes(cfg, obs_dim=4, act_dim=2) == total == 22056
    half = estimate_rollout_bytes(dataclasses.replace(cfg, dtype="float32"), 4, 2)
    assert half == 22056 // 2
    with pytest.raises(ValueError, match="obs_dim"):
        estimate_rollout_bytes(cfg, 0, 2)


def test_check_memory_refuses_with_the_estimate():
    cfg = TRPOConfig(n_envs=4, n_steps=1000)
    need = estimate_rollout_bytes(cfg, 17, 6)
    assert check_memory(cfg, 17, 6, available_bytes=need) == need
    with pytest.raises(MemoryBudgetError, match=r"4 × 1000 = 4000 transitions.*GiB.*n_steps"):
        check_memory(cfg, 17, 6, available_bytes=need - 1)
    assert issubclass(MemoryBudgetError, ValueError)
    with pytest.raises(MemoryBudgetError, match="memory_limit_gb"):
        check_memory(dataclasses.replace(cfg, memory_limit_gb=1e-6), 17, 6)


def test_check_memory_against_this_machine():
    avail = available_memory_bytes()
    assert avail is None or avail > 0
    if avail is None:
        pytest.skip("available memory cannot be determined here")
    check_memory(TRPOConfig(), 4, 2)  # the default batch fits anywhere
    huge = TRPOConfig(n_envs=1024, n_steps=10**9)  # ~10^12 transitions: petabytes
    with pytest.raises(MemoryBudgetError, match="available host memory"):
        check_memory(huge, 376, 17)


@pytest.mark.parametrize(
    "action_space",
    [gym.spaces.Discrete(3), gym.spaces.Box(-1.0, 1.0, (2,), np.float32)],
    ids=["discrete", "box"],
)
def test_parameter_count_matches_the_real_networks(action_space):
    obs_space = gym.spaces.Box(-1.0, 1.0, (5,), np.float32)
    hidden = (7, 4)
    actor = make_actor(obs_space, action_space, hidden)
    critic = make_critic(obs_space, hidden)
    act_dim = 3 if isinstance(action_space, gym.spaces.Discrete) else 2
    counted_actor = mlp_parameter_count((5, *hidden, act_dim))
    real_actor = sum(p.numel() for p in actor.parameters())
    # the estimate adds act_dim for a Gaussian's log σ: exact for Box, an upper bound else
    assert real_actor <= counted_actor + act_dim
    assert real_actor >= counted_actor
    assert sum(p.numel() for p in critic.parameters()) == mlp_parameter_count((5, *hidden, 1))


def test_huge_networks_are_refused_even_with_a_tiny_batch():
    """50000 × 50000 hidden units: 2.5·10⁹ weights (10 GB each copy in float32); the rollout
    of 1 × 1 transitions alone is a few bytes, the networks are what cannot fit."""
    cfg = TRPOConfig(n_envs=1, n_steps=1, hidden_sizes=(50_000, 50_000))
    need = estimate_rollout_bytes(cfg, 1, 1)
    weights = 2 * 50_000 * 50_001 * 4  # the hidden-to-hidden layers of actor and critic
    assert need >= 8 * weights  # weights, gradients, Adam state, CG vectors, copies
    with pytest.raises(MemoryBudgetError, match="hidden_sizes"):
        check_memory(cfg, 1, 1, available_bytes=64 * 2**30)
