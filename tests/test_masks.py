"""Action masks (trpo.masks): never an invalid action in rollouts or evaluation, the masked
policy step's Fisher against double backprop, clear errors for bad combinations."""

from __future__ import annotations

import importlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from natgrad.families import kl_divergence, mask_logits
from natgrad.params import ParamSpace
from trpo import TRPOConfig, train
from trpo.evaluation import evaluate_policy
from trpo.policy import make_actor
from trpo.rollout import collect_rollout, init_rollout_state, make_envs
from trpo.train import TrainingError
from trpo.update import _fisher

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(eval_episodes=0, plot=False, progress=False, tensorboard=False)


class _MaskedMulti(gym.Env):
    """MultiDiscrete([3, 4]) with a random valid subset per state, offered by action_masks()
    (sb3-contrib's convention); stepping an invalid action raises."""

    observation_space = gym.spaces.Box(-1, 1, (4,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 4])

    def _new_mask(self):
        m = self.np_random.random(7) < 0.5
        m[self.np_random.integers(3)] = m[3 + self.np_random.integers(4)] = True
        self.mask, self.t = m, getattr(self, "t", 0)
        return self.np_random.uniform(-1, 1, 4).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._new_mask(), {}

    def step(self, action):
        if not (self.mask[action[0]] and self.mask[3 + action[1]]):
            raise AssertionError(f"invalid action {action} under mask {self.mask}")
        self.t += 1
        return self._new_mask(), float(action[0] == 2), False, self.t >= 20, {}

    def action_masks(self):
        return self.mask


gym.register("MaskedMulti-v0", entry_point=_MaskedMulti)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("async_", [False, True])
def test_no_invalid_action_is_sampled_over_many_taxi_steps(backend, async_):
    if async_ and backend == "torch":
        pytest.skip("one async case is enough")
    envs = make_envs("Taxi-v4", 4, async_=async_)
    try:
        torch.manual_seed(0)
        actor = make_actor(envs.single_observation_space, envs.single_action_space, (16,))
        with torch.no_grad():  # a policy that wants the illegal pick-up (action 4) most
            actor.layers[-1].bias.copy_(torch.tensor([0, 0, 0, 0, 5.0, 0]))
        critic = torch.nn.Linear(500, 1)
        state = init_rollout_state(envs, 0, action_masks="auto")
        assert state.mask_source == "info"
        g = torch.Generator().manual_seed(0)
        for _ in range(2):  # 2 × 1000 × 4 = 8000 steps, episodes ending and resetting
            r = collect_rollout(
                envs, actor, _Critic(critic), 1000, state=state, generator=g,
                policy_backend=backend,
            )
            assert r.action_masks.gather(-1, r.actions.unsqueeze(-1)).all()
            assert torch.isfinite(r.log_probs).all()
            assert (~r.action_masks).any()  # masks really exclude actions
            assert (r.rewards > -10).all()  # Taxi's -10: an illegal pick-up / drop-off
    finally:
        envs.close()


class _Critic(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).squeeze(-1)


@pytest.mark.parametrize("act", [gym.spaces.Discrete(5), gym.spaces.MultiDiscrete([2, 3])])
def test_the_masked_fisher_is_the_hessian_of_the_masked_mean_kl(act):
    space_in = gym.spaces.Box(-1, 1, (3,), np.float64)
    torch.manual_seed(0)
    actor = make_actor(space_in, act, (6,)).double()
    obs = torch.randn(11, 3, dtype=torch.float64)
    masks = torch.rand(11, 5) < 0.6
    masks[:, 0] = masks[:, -1] = True  # each head keeps a valid action
    params = {k: v.detach() for k, v in actor.named_parameters()}
    space = ParamSpace(params)
    F = _fisher(actor, params, obs, masks)
    old = mask_logits(actor.functional_dist_params(params, obs), masks)
    old = [t.detach() for t in old] if isinstance(old, list) else old.detach()

    def kl(theta):
        new = mask_logits(actor.functional_dist_params(space.unravel(theta), obs), masks)
        return kl_divergence(actor.family, old, new).mean()

    theta = space.ravel(params)
    v = torch.randn_like(theta)
    hvp = torch.func.jvp(torch.func.grad(kl), (theta,), (v,))[1]
    torch.testing.assert_close(F @ v, hvp)
    assert not torch.allclose(F @ v, _fisher(actor, params, obs) @ v)  # masks matter


def test_multidiscrete_masks_from_an_action_masks_method_train(tmp_path):
    # _MaskedMulti raises on any invalid action: two updates and the final evaluation pass
    config = TRPOConfig(
        env_id="MaskedMulti-v0", action_masks="on", n_envs=2, n_steps=64, total_steps=256,
        runs_root=str(tmp_path), **{**QUIET, "eval_episodes": 2},
    )
    result = train(config)
    assert result.metrics["trpo/line_search_success"] == [1.0] * 2
    assert len(result.eval_returns) == 2


def test_evaluation_plays_the_masked_mode():
    env = gym.make("Taxi-v4")
    torch.manual_seed(0)
    actor = make_actor(gym.spaces.Box(0, 1, (500,)), env.action_space, (8,))
    env.close()
    with torch.no_grad():  # the mode is the illegal pick-up everywhere
        actor.layers[-1].bias.copy_(torch.tensor([0, 0, 0, 0, 50.0, 0]))
    assert evaluate_policy(actor, "Taxi-v4", episodes=1, action_masks="off") == [-2000.0]
    assert evaluate_policy(actor, "Taxi-v4", episodes=1)[0] > -2000 + 10  # no -10 penalty


def test_masks_on_a_box_space_or_without_masks_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="action_masks='on' needs a Discrete or MultiDiscrete"):
        train(TRPOConfig(env_id="Pendulum-v1", action_masks="on", runs_root=str(tmp_path)))
    with pytest.raises(TrainingError, match=r"provides no action masks.*action_masks='off'"):
        train(TRPOConfig(env_id="CartPole-v1", action_masks="on", runs_root=str(tmp_path)))
    with pytest.raises(ValueError, match="^action_masks must be 'auto', 'on' or 'off'"):
        TRPOConfig(action_masks="yes")


def test_the_example_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    example = importlib.import_module("masked_taxi")
    runs = example.main(["--total-steps", "2048", "--runs-root", str(tmp_path)])
    assert runs["on"][0][0] == runs["off"][0][0] == [2048]  # one update each


def test_mask_detection_on_subprocess_envs_keeps_them_alive():
    # A missing action_masks attribute must not be looked up by raising inside a worker.
    envs = make_envs("CartPole-v1", 2, async_=True)
    try:
        assert init_rollout_state(envs, 0, action_masks="auto").mask_source is None
        envs.step(np.zeros(2, dtype=np.int64))
    finally:
        envs.close()
    envs = make_envs("MaskedMulti-v0", 2, async_=True)
    try:
        state = init_rollout_state(envs, 0, action_masks="on")
        assert state.mask_source == "method" and state.masks.shape == (2, 7)
    finally:
        envs.close()
