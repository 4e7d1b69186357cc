"""Recurrent TRPO (trpo.recurrent): the GRU's Fisher over sequences against double backprop
of the mean KL in float64, the resets at episode starts, the rollout's stored states against
a recomputation, the sequence batch, bad combinations, and a run that learns a POMDP."""

from __future__ import annotations

import importlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from natgrad.families import kl_divergence
from natgrad.params import ParamSpace
from trpo import TRPOConfig, train
from trpo.evaluation import evaluate_policy, load_policy
from trpo.networks import build_actor, build_critic
from trpo.recurrent import GRUActor, sequence_batch, to_sequences
from trpo.rollout import collect_rollout, init_rollout_state, make_envs
from trpo.run import parse_cli
from trpo.update import PolicyBatch, _fisher, _fisher_states

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(plot=False, progress=False, tensorboard=False)
OBS = gym.spaces.Box(-1, 1, (3,), np.float32)


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return importlib.import_module("recurrent_cartpole")


def _actor(action_space, hidden=(5, 4)) -> GRUActor:
    torch.manual_seed(0)
    return build_actor(TRPOConfig(policy="gru", hidden_sizes=hidden), OBS, action_space).double()


def _sequences(B: int, L: int, H: int, D: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    starts = (torch.rand(B, L, 1, generator=g) < 0.25).double()
    starts[0, 2] = 1.0  # at least one reset inside a sequence
    h = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    return torch.cat([starts, h, x], -1)


def _mean_kl_hvp(actor, params, obs, v):
    space = ParamSpace(params)
    old = actor.functional_dist_params(params, obs)
    old = torch.utils._pytree.tree_map(torch.Tensor.detach, old)

    def kl(theta):
        new = actor.functional_dist_params(space.unravel(theta), obs)
        return kl_divergence(actor.family, old, new).mean()

    return torch.func.jvp(torch.func.grad(kl), (space.ravel(params),), (v,))[1]


@pytest.mark.parametrize(
    "action_space",
    [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,)), gym.spaces.MultiDiscrete([2, 3])],
)
def test_sequence_fisher_vector_product_is_double_backprop_of_the_mean_kl(action_space):
    actor = _actor(action_space)
    obs = _sequences(B=3, L=6, H=4)
    params = {k: v.detach() for k, v in actor.named_parameters()}
    v = torch.randn(ParamSpace(params).numel, dtype=torch.float64)
    F = _fisher(actor, params, obs)
    torch.testing.assert_close(F @ v, _mean_kl_hvp(actor, params, obs, v))
    out = actor(obs)
    assert (out[0] if isinstance(out, (tuple, list)) else out).shape[0] == 18  # B·L rows


def test_forward_over_a_sequence_equals_stepping_and_resets_forget_the_past():
    actor = _actor(gym.spaces.Discrete(3))
    obs = _sequences(B=2, L=6, H=4)
    logits = actor(obs).reshape(2, 6, 3)
    h = obs[:, 0, 1:5]
    for t in range(6):
        h = h * (1 - obs[:, t, :1])
        step_logits, h = actor.step(obs[:, t, 5:], h)
        torch.testing.assert_close(step_logits, logits[:, t])
    # sequence 0 restarts at step 2: its outputs from there on ignore the earlier inputs
    changed = obs.clone()
    changed[0, :2, 1:] += 1.0
    torch.testing.assert_close(actor(changed).reshape(2, 6, 3)[0, 2:], logits[0, 2:])
    assert not torch.allclose(actor(changed).reshape(2, 6, 3)[0, :2], logits[0, :2])


def test_rollout_stores_the_states_the_policy_acted_with():
    config = TRPOConfig(policy="gru", hidden_sizes=(8, 6))
    envs = make_envs("CartPole-v1", 3)
    actor = build_actor(config, envs.single_observation_space, envs.single_action_space)
    critic = build_critic(config, envs.single_observation_space, envs.single_action_space)
    state = init_rollout_state(envs, seed=0)
    g = torch.Generator().manual_seed(0)
    first = collect_rollout(envs, actor, critic, 40, state=state, generator=g)
    second = collect_rollout(envs, actor, critic, 40, state=state, generator=g)
    envs.close()
    for r in (first, second):
        assert r.obs.shape == (40, 3, 1 + 6 + 4)
        done = (r.terminations | r.truncations).float()
        assert done.sum() > 0  # episodes end inside the rollout: the resets are exercised
        torch.testing.assert_close(r.obs[1:, :, 0], done[:-1])  # start flags
        # recompute the whole rollout as one sequence per env from its first stored state
        seq = to_sequences(r.obs, 40)
        with torch.no_grad():
            logits = actor(seq).reshape(3, 40, 2).transpose(0, 1)
            h = seq[:, 0, 1:7]
            for t in range(1, 40):
                h = actor.step(seq[:, t - 1, 7:], h)[1] * (1 - seq[:, t, :1])
                torch.testing.assert_close(h, seq[:, t, 1:7], atol=1e-6, rtol=1e-5)
        log_probs = torch.log_softmax(logits, -1).gather(-1, r.actions[..., None])[..., 0]
        torch.testing.assert_close(log_probs, r.log_probs, atol=1e-5, rtol=1e-5)
    assert first.obs[0, :, 0].all()  # the envs were just reset
    # the state carried over: the second rollout starts where the first stopped
    with torch.no_grad():
        h_last = actor.step(first.obs[-1, :, 7:], first.obs[-1, :, 1:7])[1]
    keep = 1 - second.obs[0, :, :1]
    torch.testing.assert_close(second.obs[0, :, 1:7], h_last * keep, atol=1e-6, rtol=1e-5)
    # V(s_T) bootstraps the last step from the row the next rollout starts with
    with torch.no_grad():
        v_next = critic(second.obs[0])
    going = ~(first.terminations[-1] | first.truncations[-1])
    torch.testing.assert_close(first.next_values[-1][going], v_next[going], atol=1e-5, rtol=1e-5)


def test_sequence_batch_orders_every_tensor_like_the_actor_rows():
    T, N, L = 8, 3, 4
    obs = torch.arange(T * N, dtype=torch.float64).reshape(T, N, 1)
    steps = torch.arange(T * N).reshape(T, N)
    seq, flat = sequence_batch(obs, L, steps)
    assert seq.shape == (T // L * N, L, 1)
    torch.testing.assert_close(seq.flatten(0, 1)[:, 0], flat.double())
    assert seq[1, :, 0].tolist() == [1.0, 4.0, 7.0, 10.0]  # env 1, steps 0..3
    # the Fisher's subsample takes whole sequences with their masks
    masks = torch.arange(T * N).reshape(T * N, 1) % 2 == 0
    batch = PolicyBatch(seq, flat, flat.double(), masks=sequence_batch(obs, L, masks.reshape(T, N, 1))[1])
    sub_obs, sub_masks = _fisher_states(batch, 0.5, torch.Generator().manual_seed(0))
    assert sub_masks.shape == (sub_obs.shape[0] * L, 1)
    expect = (sub_obs.flatten(0, 1)[:, 0].long() % 2 == 0)[:, None]
    assert torch.equal(sub_masks, expect)


def test_bad_combinations_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"bptt_length \(3\) must divide n_steps \(512\)"):
        TRPOConfig(policy="gru", bptt_length=3)
    with pytest.raises(ValueError, match="policy='gru' does not work with actor_factory"):
        TRPOConfig(policy="gru", actor_factory="pkg.mod:f")
    with pytest.raises(ValueError, match="policy='gru' does not work with envpool's async"):
        TRPOConfig(policy="gru", env_backend="envpool", async_envs=True)
    image = gym.spaces.Box(0, 255, (12, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="policy='gru' needs flat Box observations"):
        build_actor(TRPOConfig(policy="gru"), image, gym.spaces.Discrete(2))
    with pytest.raises(ValueError, match="a actor module of your own is not supported|an? actor"):
        train(TRPOConfig(policy="gru", runs_root=str(tmp_path), **QUIET), actor=torch.nn.Linear(4, 2))
    assert parse_cli(["--policy", "gru", "--bptt-length", "16"]).bptt_length == 16


def test_gru_learns_the_cartpole_without_velocities_and_evaluation_rebuilds_it(tmp_path, example):
    """CartPoleNoVel-v1 (examples/recurrent_cartpole.py): 40,960 steps lift the training
    return from ~20 (random) to over 100; load_policy rebuilds the GRU and plays it."""
    config = TRPOConfig(
        env_id="recurrent_cartpole:CartPoleNoVel-v1", policy="gru", n_envs=8, n_steps=256,
        bptt_length=32, total_steps=40_960, eval_episodes=0, runs_root=str(tmp_path), **QUIET,
    )
    result = train(config)
    returns = [r for r in result.metrics["charts/episode_return"] if r is not None]
    assert np.mean(returns[-3:]) > 100 > 3 * np.mean(returns[:2])
    actor, _, env_id = load_policy(result.run_dir, allow_import=True)
    assert isinstance(actor, GRUActor) and env_id == config.env_id
    torch.testing.assert_close(actor.state_dict(), result.actor.state_dict())
    assert np.mean(evaluate_policy(actor, env_id, episodes=2)) > 50


def test_the_example_runs_and_plots(tmp_path, example):
    png = tmp_path / "curves.png"
    runs = example.main(["--total-steps", "4096", "--runs-root", str(tmp_path), "--plot", str(png)])
    assert set(runs) == {"gru", "mlp"} and png.stat().st_size > 0
    assert all(np.isfinite(r["eval"]) for per_seed in runs.values() for r in per_seed)
