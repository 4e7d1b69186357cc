"""The envpool backend (trpo.envpool_env) against gymnasium's, the reference semantics.

Tests that step envpool skip without it (CI installs ``.[dev]`` only); the "not installed"
errors are tested everywhere by hiding the module.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo import TRPOConfig, train
from trpo.checkpoint import list_checkpoints
from trpo.envpool_env import (
    EnvPoolUnavailable,
    EnvPoolVectorEnv,
    resolve_env_backend,
)
from trpo.envs import make_envs
from trpo.evaluation import evaluate_policy
from trpo.logger import read_metrics
from trpo.policy import make_actor, make_critic
from trpo.rollout import collect_rollout, init_rollout_state

ROOT = Path(__file__).resolve().parent.parent
HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
needs_envpool = pytest.mark.skipif(
    importlib.util.find_spec("envpool") is None, reason="envpool is not installed"
)
BACKENDS = ("gymnasium", "envpool")
FAST = dict(
    hidden_sizes=(8,),
    cg_iters=3,
    critic_epochs=1,
    eval_episodes=0,
    plot=False,
    progress=False,
    tensorboard=False,
)


@pytest.fixture
def no_envpool(monkeypatch):
    """As if envpool were not installed: ``import envpool`` raises ImportError."""
    monkeypatch.setitem(sys.modules, "envpool", None)


# --- errors, without envpool ------------------------------------------------------------------
def test_envpool_backend_without_the_package_names_the_extra(no_envpool):
    with pytest.raises(EnvPoolUnavailable, match=r"pip install -e '\.\[envpool\]'"):
        resolve_env_backend("envpool", "CartPole-v1")
    with pytest.raises(EnvPoolUnavailable):
        make_envs("CartPole-v1", 2, backend="envpool")
    assert resolve_env_backend("auto", "CartPole-v1") == "gymnasium"
    assert issubclass(EnvPoolUnavailable, ValueError)  # the CLI's one-line user error


def test_training_on_envpool_without_the_package_fails_before_any_run_dir(tmp_path, no_envpool):
    with pytest.raises(EnvPoolUnavailable, match="envpool"):
        train(TRPOConfig(env_backend="envpool", runs_root=str(tmp_path), **FAST))
    assert not any(tmp_path.iterdir())


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="env_backend must be one of"):
        resolve_env_backend("envpol", "CartPole-v1")
    with pytest.raises(ValueError, match="^env_backend must"):
        TRPOConfig(env_backend="envpol")
    with pytest.raises(ValueError, match="^env_threads must"):
        TRPOConfig(env_threads=-1)


# --- resolution and seeding ---------------------------------------------------------------------
@needs_envpool
def test_resolution_of_ids():
    assert resolve_env_backend("auto", "CartPole-v1") == "envpool"
    assert resolve_env_backend("auto", "tests.nowhere:Env-v0") == "gymnasium"
    assert resolve_env_backend("gymnasium", "CartPole-v1") == "gymnasium"
    with pytest.raises(ValueError, match="not an envpool env. Did you mean 'CartPole-v1'"):
        resolve_env_backend("envpool", "CartPol-v1")
    with pytest.raises(ValueError, match="takes no wrappers"):
        make_envs("CartPole-v1", 2, backend="envpool", wrappers=[lambda e: e])
    with pytest.raises(ValueError, match="async_envs on envpool .* n_envs >= 2"):
        make_envs("CartPole-v1", 1, backend="envpool", async_=True)


@needs_envpool
def test_seeding_is_per_env_and_reproducible():
    envs = EnvPoolVectorEnv("CartPole-v1", 3)
    a, _ = envs.reset(seed=5)
    b, _ = envs.reset(seed=[5, 6, 7])  # the same seeds: env i gets seed + i
    c, _ = envs.reset(seed=[6, 7, 8])
    d, _ = envs.reset(seed=[7, 100, 6])  # any per-env list
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1:], c[:2])
    np.testing.assert_array_equal(d[0], a[2])
    assert not np.allclose(a[0], c[0])
    envs.close()


# --- the same actions on both backends -------------------------------------------------------------
def _both(env_id: str, n: int, **env_kwargs) -> dict[str, gym.vector.VectorEnv]:
    return {b: make_envs(env_id, n, backend=b, env_kwargs=env_kwargs) for b in BACKENDS}


@needs_envpool
@pytest.mark.parametrize(
    "env_id",
    [
        "CartPole-v1",
        "Pendulum-v1",
        pytest.param("Hopper-v5", marks=pytest.mark.skipif(not HAS_MUJOCO, reason="no mujoco")),
    ],
)
def test_spaces_and_autoreset_mode_match(env_id):
    envs = _both(env_id, 2)
    gym_envs, pool = envs["gymnasium"], envs["envpool"]
    assert pool.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert pool.num_envs == gym_envs.num_envs == 2
    assert pool.single_observation_space.shape == gym_envs.single_observation_space.shape
    a_pool, a_gym = pool.single_action_space, gym_envs.single_action_space
    assert type(a_pool) is type(a_gym)
    if isinstance(a_gym, gym.spaces.Box):  # envpool's Box dtype may be float64: bounds match
        np.testing.assert_allclose(a_pool.low, a_gym.low)
        np.testing.assert_allclose(a_pool.high, a_gym.high)
    else:
        assert a_pool == a_gym
    for e in envs.values():
        e.close()


def _cartpole_check(envs: gym.vector.VectorEnv, actions: np.ndarray, limit: int) -> dict:
    """Step ``envs`` with ``actions (T, N)``; check every transition against gymnasium's
    CartPole dynamics started from the previous observation, and the autoreset semantics.
    Returns the counts of terminations and truncations."""
    ref = gym.make("CartPole-v1").unwrapped
    ref.reset(seed=0)
    obs, _ = envs.reset(seed=11)
    lengths = np.zeros(envs.num_envs, dtype=int)
    counts = {"term": 0, "trunc": 0, "rewards": []}
    for a in actions:
        prev = np.array(obs, dtype=np.float64)
        obs, rew, term, trunc, infos = envs.step(a)
        obs = np.array(obs)
        lengths += 1
        counts["rewards"].extend(np.asarray(rew).tolist())
        for i in range(envs.num_envs):
            ref.state, ref.steps_beyond_terminated = prev[i].copy(), None
            expected, _, expected_term, _, _ = ref.step(int(a[i]))
            done = term[i] or trunc[i]
            # The transition of env i: its true next observation (the final one at an end).
            nxt = infos["final_obs"][i] if done else obs[i]
            np.testing.assert_allclose(nxt, expected, atol=1e-4, rtol=1e-4)
            if lengths[i] == limit and expected_term:  # both end it; the flags may differ
                assert term[i] or trunc[i]  # (docs/envpool.md, known differences)
            else:
                assert bool(term[i]) == expected_term, (i, lengths[i])
                assert bool(trunc[i]) == (lengths[i] == limit), (i, lengths[i])
            if done:
                assert bool(infos["_final_obs"][i])
                assert np.abs(obs[i]).max() <= 0.05  # already the next episode's first obs
                counts["term" if term[i] else "trunc"] += 1
                lengths[i] = 0
    envs.close()
    return counts


@needs_envpool
def test_cartpole_transitions_follow_the_dynamics_on_both_backends():
    # Same actions; the initial states differ (each backend has its own RNG), so boundaries
    # are compared with the dynamics, step by step, rather than with each other.
    actions = np.random.default_rng(0).integers(0, 2, size=(150, 4))
    counts = {
        b: _cartpole_check(e, actions, 20)
        for b, e in _both("CartPole-v1", 4, max_episode_steps=20).items()
    }
    for c in counts.values():
        assert c["term"] > 5 and c["trunc"] > 5, counts
        assert set(c["rewards"]) == {1.0}  # the same reward scale


def _hopper_run(envs: gym.vector.VectorEnv, actions: np.ndarray) -> dict:
    obs, _ = envs.reset(seed=3)
    out = {"rewards": [], "term_z": [], "trunc": 0, "reset_z": [], "lengths": []}
    length = np.zeros(envs.num_envs, dtype=int)
    for a in actions:
        obs, rew, term, trunc, infos = envs.step(a)
        out["rewards"].extend(np.asarray(rew).tolist())
        length += 1
        for i in np.flatnonzero(np.logical_or(term, trunc)):
            final = infos["final_obs"][i]
            healthy = 0.7 < final[0] and abs(final[1]) < 0.2 and np.abs(final[1:]).max() < 100
            assert healthy != bool(term[i])  # terminated exactly when unhealthy
            out["trunc"] += int(trunc[i])
            out["reset_z"].append(float(obs[i][0]))
            out["lengths"].append(int(length[i]))
            length[i] = 0
    envs.close()
    return out


@needs_envpool
@pytest.mark.skipif(not HAS_MUJOCO, reason="mujoco is not installed")
def test_hopper_boundaries_and_reward_scale_match():
    actions = np.random.default_rng(1).uniform(-1, 1, size=(200, 4, 3))
    runs = {
        b: _hopper_run(e, actions) for b, e in _both("Hopper-v5", 4, max_episode_steps=40).items()
    }
    for r in runs.values():
        assert r["trunc"] > 0 and len(r["lengths"]) > 10 and max(r["lengths"]) <= 40
        np.testing.assert_allclose(r["reset_z"], 1.25, atol=0.01)  # fresh episodes
    mean = {b: np.mean(r["rewards"]) for b, r in runs.items()}
    assert mean["envpool"] == pytest.approx(mean["gymnasium"], rel=0.25), mean
    mean_len = {b: np.mean(r["lengths"]) for b, r in runs.items()}
    assert mean_len["envpool"] == pytest.approx(mean_len["gymnasium"], rel=0.3), mean_len


@needs_envpool
def test_rollout_bootstraps_truncations_from_the_final_observation():
    envs = make_envs("CartPole-v1", 3, backend="envpool", env_kwargs={"max_episode_steps": 8})
    torch.manual_seed(0)
    actor = make_actor(envs.single_observation_space, envs.single_action_space, (8,))
    critic = make_critic(envs.single_observation_space, (8,))
    state = init_rollout_state(envs, seed=1)
    r = collect_rollout(
        envs, actor, critic, 40, state=state, generator=torch.Generator().manual_seed(0)
    )
    assert r.truncations.any()
    # Where an episode ended, V(s') is not V of the next row's (reset) observation.
    ended = (r.truncations | r.terminations)[:-1]
    with torch.no_grad():
        v_next_row = critic(r.obs[1:])
    assert not torch.allclose(r.next_values[:-1][ended], v_next_row[ended])
    assert torch.allclose(r.next_values[:-1][~ended], v_next_row[~ended])
    assert int(r.episode_lengths.sum()) + int(state.episode_lengths.sum()) == 40 * 3
    assert int(r.episode_lengths.max()) <= 8
    envs.close()


@needs_envpool
def test_pipelined_pools_step_like_one_pool():
    kw = dict(num_threads=1, env_kwargs={"max_episode_steps": 9})
    one, two = (
        EnvPoolVectorEnv("CartPole-v1", 5, **kw),
        EnvPoolVectorEnv("CartPole-v1", 5, pipelined=True, **kw),
    )
    assert [g.indices(5)[:2] for g in two.groups] == [(0, 2), (2, 5)]
    np.testing.assert_array_equal(one.reset(seed=4)[0], two.reset(seed=4)[0])
    ended = 0
    for a in np.random.default_rng(0).integers(0, 2, size=(40, 5)):
        out1, out2 = one.step(a), two.step(a)
        for x, y in zip(out1[:4], out2[:4]):
            np.testing.assert_array_equal(x, y)
        assert out1[4].keys() == out2[4].keys()
        if out1[4]:
            np.testing.assert_array_equal(out1[4]["_final_obs"], out2[4]["_final_obs"])
            np.testing.assert_array_equal(out1[4]["final_obs"], out2[4]["final_obs"])
            ended += int(out1[4]["_final_obs"].sum())
    assert ended > 10
    one.close(), two.close()


@needs_envpool
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_async_collection_gives_the_synchronous_rollout(env_id):
    # The same seeds, policy and noise: overlapping policy and simulation changes nothing but
    # the speed (each env's T steps in order, every action of the same policy).
    rollouts = []
    for async_ in (False, True):
        envs = make_envs(env_id, 4, backend="envpool", async_=async_, num_threads=1)
        torch.manual_seed(0)
        actor = make_actor(envs.single_observation_space, envs.single_action_space, (8,))
        critic = make_critic(envs.single_observation_space, (8,))
        state = init_rollout_state(envs, seed=2)
        gen = torch.Generator().manual_seed(0)
        rollouts.append(
            [collect_rollout(envs, actor, critic, 60, state=state, generator=gen) for _ in range(2)]
        )
        envs.close()
    for sync, pipelined in zip(*rollouts):
        for name in (
            "obs",
            "actions",
            "log_probs",
            "rewards",
            "terminations",
            "truncations",
            "values",
            "next_values",
            "episode_returns",
            "episode_lengths",
        ):
            torch.testing.assert_close(getattr(pipelined, name), getattr(sync, name), msg=name)
        assert sync.global_step == pipelined.global_step


@needs_envpool
def test_an_env_error_during_async_collection_names_the_step(monkeypatch):
    envs = make_envs("CartPole-v1", 4, backend="envpool", async_=True, num_threads=1)
    torch.manual_seed(0)
    actor = make_actor(envs.single_observation_space, envs.single_action_space, (8,))
    critic = make_critic(envs.single_observation_space, (8,))
    state = init_rollout_state(envs, seed=2)
    real, calls = envs.recv, {"n": 0}

    def recv(group):
        calls["n"] += 1
        if calls["n"] == 7:  # group 0 of step 3
            raise OSError("simulator died")
        return real(group)

    monkeypatch.setattr(envs, "recv", recv)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match=r"raised during step at global step 12: OSError"):
        collect_rollout(envs, actor, critic, 10, state=state, generator=gen)
    assert state.global_step == 0  # nothing of the failed rollout was kept
    envs.close()


# --- training on envpool -------------------------------------------------------------------------
@needs_envpool
def test_config_records_the_resolved_backend_and_resume_keeps_working(tmp_path, capsys):
    kw = dict(n_envs=4, n_steps=32, checkpoint_every=1, runs_root=str(tmp_path), **FAST)
    first = train(TRPOConfig(env_backend="auto", total_steps=2 * 128, run_name="r", **kw))
    assert "env backend: envpool" in capsys.readouterr().out
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert (saved["env_backend"], saved["env_threads"]) == ("envpool", 0)
    resumed = train(TRPOConfig(resume=str(first.run_dir), total_steps=4 * 128))
    assert resumed.global_step == 4 * 128
    assert resumed.config.env_backend == "envpool"
    assert len(resumed.metrics["trpo/kl"]) == 4


@needs_envpool
@pytest.mark.slow
def test_policy_trained_on_envpool_scores_in_gymnasiums_env(tmp_path):
    # The budget of tests/test_train.py's CartPole test (24 updates of 1024 steps), ~6 s on
    # 2 cores; evaluation means over 5 episodes for seeds 1-4 were 500, 500, 210, 500.
    config = TRPOConfig(
        env_backend="envpool",
        env_threads=1,
        total_steps=24 * 1024,
        n_envs=8,
        n_steps=128,
        seed=1,
        runs_root=str(tmp_path),
        eval_episodes=0,
        plot=False,
        progress=False,
        tensorboard=False,
    )
    result = train(config)
    returns = evaluate_policy(result.actor, "CartPole-v1", episodes=5, seed=100)
    assert np.mean(returns) >= 150, returns  # random: about 20
    assert math.isfinite(result.metrics["charts/episode_return"][-1])


@needs_envpool
@pytest.mark.parametrize("async_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torchrun_on_envpool(tmp_path, async_):
    # Two ranks, each its own pool(s) seeded seed + rank · RANK_SEED_STRIDE + i by the same
    # reset(seed=[...]) as on gymnasium; the episodes of both ranks are gathered.
    flags = "--env-id CartPole-v1 --env-backend envpool --env-threads 1 --n-envs 2 --n-steps 64"
    flags += " --hidden-sizes 8 --cg-iters 3 --critic-epochs 1 --eval-episodes 0 --no-progress"
    flags += " --no-tensorboard --no-plot --checkpoint-every 1 --total-steps 512 --run-name r"
    flags += " --async-envs" * async_
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "trpo.run", *flags.split(), "--runs-root", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "r"
    assert json.loads((run_dir / "config.json").read_text())["env_backend"] == "envpool"
    assert max(u for u, _ in list_checkpoints(run_dir)) == 2  # 512 steps = 2 updates × 2 ranks
    metrics = read_metrics(run_dir / "metrics.csv")
    assert metrics["global_step"] == [256, 512]
    assert all(n > 0 for n in metrics["charts/episodes"])
