"""Tests for trpo.rollout on tiny deterministic envs registered here.

``CounterEnv`` makes every transition identifiable: the observation is
``(k, s, u)`` with ``k`` the episode index of that env, ``s`` the step in the
episode and ``u`` a per-episode draw from the env's seeded RNG; the reward of
step ``s → s+1`` is ``10k + s + 1``. Even episodes *terminate* after 3 steps, odd
ones are *truncated* by the registered time limit of 5 steps. With a critic
``V(k, s, u) = 100k + s`` the stored values say exactly which observation they
were computed from.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from natgrad.families import mask_logits, mode
from trpo.gae import compute_gae
from trpo.normalize import RewardScaler, RunningMeanStd
from trpo.policy import log_prob, make_actor
from trpo.rollout import (
    Rollout,
    collect_rollout,
    env_action_converter,
    init_rollout_state,
    make_envs,
    numpy_mode_fn,
)

COUNTER_ID = "TestCounter-v0"
ECHO_ID = "TestActionEcho-v0"
TERM_LEN, TIME_LIMIT = 3, 5


class CounterEnv(gym.Env):
    def __init__(self, nan_obs_at=None, nan_reward_at=None, raise_at=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.nan_obs_at, self.nan_reward_at, self.raise_at = nan_obs_at, nan_reward_at, raise_at
        self.k = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.k = -1
        self.k += 1
        self.s = 0
        self.u = float(self.np_random.uniform())
        return self._obs(), {}

    def _obs(self):
        return np.array([self.k, self.s, self.u], dtype=np.float32)

    def step(self, action):
        if not self.action_space.contains(action):
            raise AssertionError(f"bad action {action!r}")
        reward = 10.0 * self.k + self.s + 1.0
        self.s += 1
        if (self.k, self.s) == self.raise_at:
            raise KeyError("simulated crash")
        terminated = self.k % 2 == 0 and self.s == TERM_LEN
        obs = self._obs()
        if (self.k, self.s) == self.nan_obs_at:
            obs[1] = np.nan
        if (self.k, self.s) == self.nan_reward_at:
            reward = np.inf
        return obs, reward, terminated, False, {}


class ActionEchoEnv(gym.Env):
    """Reward = sum of the action the env received; float64 observations."""

    def __init__(self, kind="box"):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float64)
        self.action_space = {
            "box": gym.spaces.Box(-0.1, 0.2, shape=(2,), dtype=np.float32),
            "discrete": gym.spaces.Discrete(3, start=4),
            "multi_discrete": gym.spaces.MultiDiscrete([2, 3], start=[1, 2]),
            "multi_binary": gym.spaces.MultiBinary(3),
        }[kind]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, size=2), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise AssertionError(f"bad action {action!r}")
        return self.np_random.uniform(-1, 1, size=2), float(np.sum(action)), False, False, {}


gym.register(COUNTER_ID, entry_point=CounterEnv, max_episode_steps=TIME_LIMIT)
gym.register(ECHO_ID, entry_point=ActionEchoEnv, max_episode_steps=4)


class CounterCritic(nn.Module):
    """V(k, s, u) = 100 k + s."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(3, 1, dtype=dtype)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[100.0, 1.0, 0.0]]))
            self.lin.bias.zero_()

    def forward(self, obs):
        return self.lin(obs).squeeze(-1)


def _setup(n_envs=2, seed=0, dtype=torch.float32, async_=False, **env_kwargs):
    envs = make_envs(COUNTER_ID, n_envs, async_=async_, env_kwargs=env_kwargs)
    actor = make_actor(envs.single_observation_space, envs.single_action_space).to(dtype)
    critic = CounterCritic(dtype)
    state = init_rollout_state(envs, seed)
    return envs, actor, critic, state


def _check_counter_rollout(r: Rollout, first_obs: torch.Tensor) -> None:
    """Every stored transition is a real step of one episode; bootstrap targets are true."""
    obs = r.obs.double()
    k, s = obs[..., 0], obs[..., 1]
    assert torch.equal(obs[0], first_obs.double())
    ends_term = (k % 2 == 0) & (s + 1 == TERM_LEN)
    ends_trunc = (k % 2 == 1) & (s + 1 == TIME_LIMIT)
    assert torch.equal(r.terminations, ends_term)
    assert torch.equal(r.truncations, ends_trunc)
    # No stored s_t is a terminal/final observation (what a reset transition would start from).
    assert ((k % 2 == 0) & (s >= TERM_LEN)).sum() == 0
    assert ((k % 2 == 1) & (s >= TIME_LIMIT)).sum() == 0
    # Reward of the step s -> s+1 of episode k; never the 0 of a fake reset transition.
    torch.testing.assert_close(r.rewards.double(), 10 * k + s + 1, rtol=0, atol=0)
    # V(s_t) from s_t, V(s'_t) from the TRUE next observation (k, s+1), also when the
    # episode ended at t (final observation), never from the reset observation (k+1, 0).
    torch.testing.assert_close(r.values.double(), 100 * k + s, rtol=0, atol=0)
    torch.testing.assert_close(r.next_values.double(), 100 * k + s + 1, rtol=0, atol=0)
    # Consecutive stored observations: same episode and s+1, or a new episode from 0.
    done = r.terminations | r.truncations
    nk, ns = k[1:], s[1:]
    cont = ~done[:-1]
    assert torch.equal(nk[cont], k[:-1][cont]) and torch.equal(ns[cont], s[:-1][cont] + 1)
    assert torch.equal(nk[~cont], k[:-1][~cont] + 1) and (ns[~cont] == 0).all()
    assert r.terminations.any() and r.truncations.any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_reset_transition_and_true_final_obs_bootstrap(dtype, backend):
    envs, actor, critic, state = _setup(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    kw = dict(generator=g, dtype=dtype, policy_backend=backend)
    try:
        first = torch.from_numpy(state.obs.copy())
        r1 = collect_rollout(envs, actor, critic, 13, state=state, **kw)
        _check_counter_rollout(r1, first)
        # The second rollout continues where the first stopped (mid-episode).
        first = torch.from_numpy(state.obs.copy())
        r2 = collect_rollout(envs, actor, critic, 9, state=state, **kw)
        _check_counter_rollout(r2, first)
        assert torch.equal(r2.obs[0].double()[:, :2], first.double()[:, :2])
    finally:
        envs.close()
    for r in (r1, r2):
        assert r.obs.dtype == dtype and r.values.dtype == dtype and r.rewards.dtype == dtype
        assert r.actions.dtype == torch.int64 and r.actions.shape == (r.n_steps, 2)
        assert r.terminations.dtype == torch.bool
        # log-probs are those of the stored actions under the rollout policy.
        with torch.no_grad():
            expected = log_prob(actor.family, actor(r.obs), r.actions)
        torch.testing.assert_close(r.log_probs, expected)
    assert r1.global_step == 26 and r2.global_step == 26 + 18 == state.global_step
    # GAE on the batch: a truncated step bootstraps γ·V(final obs).
    adv, _ = compute_gae(
        r1.rewards, r1.values, r1.next_values, r1.terminations, r1.truncations, 0.9, 0.0
    )
    t, i = torch.nonzero(r1.truncations)[0]
    k = r1.obs[t, i, 0].double()
    torch.testing.assert_close(
        adv[t, i].double(), 10 * k + 5 + 0.9 * (100 * k + 5) - (100 * k + 4), rtol=0, atol=1e-3
    )


def test_episode_statistics_span_rollouts():
    envs, actor, critic, state = _setup(n_envs=1)
    g = torch.Generator().manual_seed(0)
    rets, lens = [], []
    for n in (4, 7, 6):  # boundaries fall inside episodes
        r = collect_rollout(envs, actor, critic, n, state=state, generator=g)
        rets += r.episode_returns.tolist()
        lens += r.episode_lengths.tolist()
    envs.close()
    # 17 steps: episodes of lengths 3, 5, 3, 5 (= 16 steps) have ended.
    assert lens == [3, 5, 3, 5]
    expected = [10 * k * L + L * (L + 1) / 2 for k, L in enumerate(lens)]
    assert rets == expected
    assert state.episode_lengths.tolist() == [1] and state.episode_returns.tolist() == [41.0]


@pytest.mark.parametrize("mode", ["async", "sync_via_envs_step"])
def test_vector_step_path_gives_the_same_rollout_as_the_direct_sync_path(mode):
    """Sync envs are stepped directly by the collector; async ones, and sync ones hidden
    behind a VectorWrapper, through ``envs.step``. All give the same rollout."""
    results = []
    for variant in ("direct", mode):
        envs, actor, critic, state = _setup(async_=variant == "async")
        if variant == "sync_via_envs_step":
            envs = gym.vector.VectorWrapper(envs)
        torch.manual_seed(0)
        actor = make_actor(envs.single_observation_space, envs.single_action_space)
        gen = torch.Generator().manual_seed(1)
        try:
            rs = []
            for _ in range(2):
                first = torch.from_numpy(state.obs.copy())
                rs.append(collect_rollout(envs, actor, critic, 11, state=state, generator=gen))
                _check_counter_rollout(rs[-1], first)
        finally:
            envs.close()
        results.append(rs)
    for a, b in zip(*results):
        for name in ("obs", "actions", "log_probs", "rewards", "values", "next_values"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.terminations, b.terminations)
        assert torch.equal(a.episode_returns, b.episode_returns)


def test_seeds_differ_per_env_and_runs_are_reproducible():
    def run():
        envs, actor, critic, state = _setup(n_envs=3, seed=7)
        torch.manual_seed(0)
        actor = make_actor(envs.single_observation_space, envs.single_action_space)
        r = collect_rollout(
            envs, actor, critic, 6, state=state, generator=torch.Generator().manual_seed(3)
        )
        envs.close()
        return r

    a, b = run(), run()
    for name in ("obs", "actions", "log_probs", "rewards", "values", "next_values"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    u = a.obs[0, :, 2]
    assert len(set(u.tolist())) == 3  # env i was seeded with 7 + i
    expected_u = [np.random.default_rng(7 + i).uniform() for i in range(3)]
    torch.testing.assert_close(
        u.double(), torch.tensor(expected_u, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_obs_normalisation_and_reward_scaling():
    # CounterEnv's observations do not depend on the actions, so a run without
    # normalisation gives the raw observations of a run with it.
    def run(normalizer, scaler):
        envs, actor, critic, state = _setup()
        g = torch.Generator().manual_seed(0)
        out = [
            collect_rollout(
                envs,
                actor,
                critic,
                n,
                state=state,
                generator=g,
                obs_normalizer=normalizer,
                reward_scaler=scaler,
            )
            for n in (8, 8)
        ]
        envs.close()
        return out, critic

    (raw1, raw2), _ = run(None, None)
    norm = RunningMeanStd((3,), clip=10.0)
    scaler = RewardScaler(gamma=0.9, n_envs=2)
    (n1, n2), critic = run(norm, scaler)
    # Rollout 1 uses the initial statistics (identity up to clipping at ±10).
    torch.testing.assert_close(n1.obs, raw1.obs.clamp(-10, 10))
    # After it, the statistics are those of the T·N raw observations it acted on.
    flat1 = raw1.obs.double().reshape(-1, 3)
    ref = RunningMeanStd((3,), clip=10.0)
    ref.update(flat1)
    torch.testing.assert_close(ref.mean, flat1.mean(0))
    # Rollout 2 is normalised with exactly those statistics; the critic saw the same inputs.
    torch.testing.assert_close(n2.obs, ref.normalize(raw2.obs))
    with torch.no_grad():
        torch.testing.assert_close(n2.values, critic(n2.obs))
    ref.update(raw2.obs.double().reshape(-1, 3))
    torch.testing.assert_close(norm.mean, ref.mean)
    torch.testing.assert_close(norm.var, ref.var)
    # Rewards are scaled as a RewardScaler scales the raw (T, N) blocks.
    ref_scaler = RewardScaler(gamma=0.9, n_envs=2)
    for raw, scaled in ((raw1, n1), (raw2, n2)):
        expected = ref_scaler.scale(raw.rewards.double(), raw.terminations | raw.truncations)
        torch.testing.assert_close(scaled.rewards, expected.float())
    # Episode statistics stay in raw reward units.
    assert torch.equal(n1.episode_returns, raw1.episode_returns)
    # A frozen normaliser is used but not updated.
    norm.frozen = True
    before = norm.state_dict()
    envs, actor, critic, state = _setup()
    collect_rollout(
        envs, actor, critic, 4, state=state, generator=torch.Generator(), obs_normalizer=norm
    )
    envs.close()
    assert all(torch.equal(before[k], norm.state_dict()[k]) for k in before)


@pytest.mark.parametrize("kind", ["box", "discrete", "multi_discrete", "multi_binary"])
def test_env_receives_converted_actions_and_log_prob_is_of_the_stored_sample(kind):
    envs = make_envs(ECHO_ID, 3, env_kwargs={"kind": kind})
    actor = make_actor(envs.single_observation_space, envs.single_action_space)
    critic = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))
    state = init_rollout_state(envs, 0)
    r = collect_rollout(
        envs, actor, critic, 40, state=state, generator=torch.Generator().manual_seed(0)
    )
    envs.close()
    a = r.actions.double()
    if kind == "box":
        assert r.actions.shape == (40, 3, 2) and r.actions.dtype == torch.float32
        low, high = torch.tensor([-0.1, -0.1]), torch.tensor([0.2, 0.2])
        assert ((r.actions < low) | (r.actions > high)).any()  # σ = 1 samples leave the box
        sent = torch.maximum(torch.minimum(r.actions, high), low).sum(-1)
    elif kind == "discrete":
        assert r.actions.shape == (40, 3) and r.actions.dtype == torch.int64
        assert set(r.actions.unique().tolist()) == {0, 1, 2}
        sent = a + 4
    elif kind == "multi_discrete":
        assert r.actions.shape == (40, 3, 2) and r.actions.dtype == torch.int64
        sent = a.sum(-1) + 3
    else:
        assert r.actions.shape == (40, 3, 3)
        assert set(r.actions.unique().tolist()) == {0.0, 1.0}
        sent = a.sum(-1)
    torch.testing.assert_close(r.rewards.double(), sent.double(), rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = log_prob(actor.family, actor(r.obs), r.actions)
    torch.testing.assert_close(r.log_probs, expected)
    # The float64 env observations are stored in the rollout dtype.
    assert r.obs.dtype == torch.float32


def test_env_action_converter_does_not_modify_the_sample():
    conv = env_action_converter(gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32))
    a = np.array([[3.0, -0.5]], dtype=np.float32)
    out = conv(a)
    np.testing.assert_array_equal(out, [[1.0, -0.5]])
    np.testing.assert_array_equal(a, [[3.0, -0.5]])


@pytest.mark.parametrize(
    "kwargs, what, step",
    [
        # Both envs reach (k=1, s=2) at vector step t = 4 (episode 0 has 3 steps) -> 4·2.
        ({"nan_obs_at": (1, 2)}, "observation", 8),
        ({"nan_reward_at": (0, 2)}, "reward", 2),
        # Episode 0 terminates at s = 3 (vector step 2): its final observation is NaN.
        ({"nan_obs_at": (0, 3)}, "final observation", 4),
        # The env crashes one step after a NaN: the NaN is reported (as the cause's context).
        ({"nan_obs_at": (0, 1), "raise_at": (0, 2)}, "observation", 0),
    ],
)
@pytest.mark.filterwarnings("ignore:.*not within the observation space:UserWarning")
def test_non_finite_env_output_names_env_and_step(kwargs, what, step):
    envs, actor, critic, state = _setup(**kwargs)
    norm = RunningMeanStd((3,))
    with pytest.raises(
        ValueError, match=rf"{COUNTER_ID}.*non-finite {what} at global step {step}\b"
    ) as info:
        collect_rollout(
            envs, actor, critic, 10, state=state, generator=torch.Generator(), obs_normalizer=norm
        )
    envs.close()
    if "raise_at" in kwargs:
        assert isinstance(info.value.__cause__, KeyError)
    assert state.global_step == 0 and float(norm.count) == 0


def test_env_exception_is_reraised_with_env_and_step():
    envs, actor, critic, state = _setup(raise_at=(1, 1))
    with pytest.raises(RuntimeError, match=rf"{COUNTER_ID}.*global step 6\b.*KeyError") as info:
        collect_rollout(envs, actor, critic, 10, state=state, generator=torch.Generator())
    assert isinstance(info.value.__cause__, KeyError)
    envs.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="pprint_registry"):
        make_envs("NoSuchEnv-v0", 1)
    with pytest.raises(ValueError, match="n_envs"):
        make_envs(COUNTER_ID, 0)
    envs, actor, critic, state = _setup()
    with pytest.raises(ValueError, match="n_steps"):
        collect_rollout(envs, actor, critic, 0, state=state, generator=torch.Generator())
    with pytest.raises(ValueError, match="dtype"):
        collect_rollout(
            envs, actor, critic, 2, state=state, generator=torch.Generator(), dtype=torch.float64
        )
    with pytest.raises(ValueError, match="policy_backend"):
        collect_rollout(
            envs, actor, critic, 2, state=state, generator=torch.Generator(), policy_backend="jax"
        )
    envs.close()
    next_step = gym.make_vec(COUNTER_ID, 1)
    with pytest.raises(ValueError, match="SAME_STEP"):
        init_rollout_state(next_step, 0)
    next_step.close()


@pytest.mark.parametrize("kind", ["box", "discrete", "multi_discrete", "multi_binary"])
def test_numpy_and_torch_backends_sample_the_same_actions(kind):
    rollouts = {}
    for backend in ("numpy", "torch"):
        envs = make_envs(ECHO_ID, 2, env_kwargs={"kind": kind})
        torch.manual_seed(0)
        actor = make_actor(envs.single_observation_space, envs.single_action_space)
        with torch.no_grad():  # move away from the near-uniform initial policy
            for p in actor.parameters():
                p.add_(torch.randn_like(p))
        critic = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))
        norm = RunningMeanStd((2,))
        norm.update(torch.randn(10, 2, generator=torch.Generator().manual_seed(1)))
        state = init_rollout_state(envs, 0)
        gen = torch.Generator().manual_seed(0)
        kw = dict(state=state, generator=gen, obs_normalizer=norm, policy_backend=backend)
        rollouts[backend] = [collect_rollout(envs, actor, critic, 30, **kw) for _ in range(2)]
        envs.close()
    for rn, rt in zip(rollouts["numpy"], rollouts["torch"]):
        torch.testing.assert_close(rn.obs, rt.obs, rtol=0, atol=0)
        if kind == "box":
            # float32 rounding differs (BLAS order, fused multiply-add): a few ulps.
            torch.testing.assert_close(rn.actions, rt.actions, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(rn.actions, rt.actions)


@pytest.mark.parametrize("kind", ["box", "discrete", "multi_discrete", "multi_binary"])
def test_numpy_mode_is_the_mode_of_the_torch_actor(kind):
    # Evaluation's numpy path (zero noise through the rollout's numpy policy) against
    # natgrad.families.mode on the torch forward, with an observation normaliser and masks.
    env = gym.make(ECHO_ID, kind=kind)
    torch.manual_seed(0)
    actor = make_actor(env.observation_space, env.action_space)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(torch.randn_like(p))
    norm = RunningMeanStd((2,))
    norm.update(torch.randn(10, 2, generator=torch.Generator().manual_seed(1)))
    act = numpy_mode_fn(actor, norm)
    obs = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    with torch.no_grad():
        want = mode(actor.family, actor(norm.normalize(torch.from_numpy(obs)))).numpy()
    got = act(obs, None)
    if kind == "box":  # float32 rounding (BLAS order): a few ulps
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)
    if kind in ("discrete", "multi_discrete"):
        width = actor.action_dim
        mask = np.random.default_rng(1).random((64, width)) < 0.5
        mask[:, 0] = True  # every head keeps a valid action
        if kind == "multi_discrete":
            mask[:, actor.nvec[0]] = True
        with torch.no_grad():
            dist = actor(norm.normalize(torch.from_numpy(obs)))
            want = mode(actor.family, mask_logits(dist, torch.from_numpy(mask))).numpy()
        np.testing.assert_array_equal(act(obs, mask), want)
    env.close()
    # Where numpy does not apply (a module that is not the built-in actor): None.
    assert numpy_mode_fn(nn.Linear(2, 2), None) is None
