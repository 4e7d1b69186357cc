"""Issue 10's underflow fix in a real training run: a policy whose Fisher has rank k − 1.

On an env with one constant observation and k actions, the Fisher of the categorical
policy ``F = E[∇log π ∇log πᵀ]`` has rank k − 1, so fixed-iteration CG on ``F + λI``
converges after k iterations; before the fix the remaining iterations ran on rounding
noise until ``pᵀ(F + λI)p`` underflowed, CG reported non-positive curvature and the update
was dropped (a zero step). With the pre-fix code (commit 74c4430) the two cases below
applied 2 of 4 (k = 2, float64) and 3 of 4 (k = 4, float32) updates. Every update must now
take a real step and the policy must learn to pick the rewarded action.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from trpo.config import TRPOConfig
from trpo.train import train

ENV_ID = "natgrad-tests/ConstantBandit{k}-v0"


class ConstantBandit(gym.Env):
    """Observation always ``[1, 0]``; action 0 pays 1, the others 0; 8 steps an episode."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, render_mode=None, k=2):
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(k)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([1.0, 0.0], np.float32), {}

    def step(self, action):
        return np.array([1.0, 0.0], np.float32), float(action == 0), False, False, {}


for _k in (2, 4):
    if ENV_ID.format(k=_k) not in gym.registry:
        gym.register(
            ENV_ID.format(k=_k), entry_point=ConstantBandit, max_episode_steps=8, kwargs={"k": _k}
        )


@pytest.mark.parametrize(("k", "dtype"), [(2, "float64"), (4, "float32")])
def test_every_update_steps_on_a_low_rank_fisher(tmp_path, k, dtype):
    config = TRPOConfig(
        env_id=ENV_ID.format(k=k), total_steps=4 * 64, n_envs=1, n_steps=64, cg_iters=30,
        cg_damping=0.1, max_kl=0.01, seed=0, runs_root=str(tmp_path), run_name="bandit",
        eval_episodes=2, torch_threads=1, progress=False, plot=False, tensorboard=False,
        normalize_obs=False, normalize_reward=False, dtype=dtype,
    )
    result = train(config)
    m = result.metrics
    assert len(m["trpo/kl"]) == 4
    assert all(s == 1.0 for s in m["trpo/line_search_success"]), m["trpo/line_search_success"]
    assert all(k > 1e-4 for k in m["trpo/kl"]), m["trpo/kl"]  # each step used its KL budget
    assert all(s > 0 for s in m["trpo/step_norm"]), m["trpo/step_norm"]
    assert result.eval_mean > 8 / k  # a random policy earns 8 / k on average
