"""Tests for trpo.cuda_graphs without a GPU.

A CUDA graph replays recorded kernels on fixed memory, so what can go wrong lies in the
plumbing around it (new data copied into the static buffers, outputs read from the recorded
tensors, the cache, the optimiser state carried in and out) and in the recorded computation
being free of host syncs. Both are tested here on CPU: the recorder is replaced by
``emulate_recording`` (replay = re-run on the static buffers, copy into the first run's
outputs), and a dispatch mode fails on every device-to-host read. The reference is the eager
step / fit on a deep copy. ``bench/gpu_check.sh`` runs the same comparisons with real graphs.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trpo.cuda_graphs as cuda_graphs
import trpo.update as update_module
from trpo.fast_critic import _FlatMLP, _minibatch_loop
from trpo.policy import make_actor, make_critic, sample
from trpo.update import PolicyBatch, fit_critic, policy_step, policy_step_tensors

DT = torch.float64
OBS = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float64)
SPACES = {
    "categorical": gym.spaces.Discrete(4),
    "diag_gaussian": gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float64),
}
STEP = dict(max_kl=0.01, cg_iters=6, cg_damping=0.1, line_search_max_tries=5)


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that copies a device value to the host."""

    BANNED = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise RuntimeError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def emulated(monkeypatch):
    """Record by emulation and count the recordings; start from an empty cache."""
    calls = []

    def counting(fn, device, leaves):
        calls.append(device)
        return cuda_graphs.emulate_recording(fn, device, leaves)

    monkeypatch.setattr(cuda_graphs, "record", counting)
    monkeypatch.setattr(cuda_graphs, "_CACHE", type(cuda_graphs._CACHE)())
    monkeypatch.setattr(cuda_graphs, "_FAILED", set())
    return calls


def _batch(actor, family, seed, n=48):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 3, generator=gen, dtype=DT) * 2 - 1
    with torch.no_grad():
        actions = sample(family, actor(obs), gen)
    return PolicyBatch(obs=obs, actions=actions, advantages=torch.randn(n, generator=gen, dtype=DT))


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("family", list(SPACES))
def test_graphed_policy_step_equals_the_eager_step_over_several_updates(family, emulated):
    torch.manual_seed(0)
    actor = make_actor(OBS, SPACES[family], (8,)).to(DT)
    ref = copy.deepcopy(actor)
    for update in range(3):  # new data every update, one recording
        batch = _batch(actor, family, seed=update)
        got = policy_step(actor, batch, cuda_graph=True, **STEP)
        want = policy_step(ref, batch, **STEP)
        assert got == want
        assert torch.equal(_flat(actor), _flat(ref))
    assert len(emulated) == 1
    # A rejected step (zero advantages: zero step) is replayed too: θ stays bit for bit.
    before = _flat(actor)
    batch = _batch(actor, family, seed=9)
    zero = PolicyBatch(batch.obs, batch.actions, torch.zeros_like(batch.advantages))
    rejected = policy_step(actor, zero, cuda_graph=True, **STEP)
    assert not rejected.applied and rejected.status == "ZERO_GRADIENT"
    assert torch.equal(_flat(actor), before)
    assert len(emulated) == 1  # same shapes and settings: the same recording
    policy_step(actor, batch, cuda_graph=True, **STEP | {"max_kl": 0.02})
    assert len(emulated) == 2  # other settings: another recording


def test_graphed_policy_step_declines_settings_that_sync(emulated):
    torch.manual_seed(0)
    actor = make_actor(OBS, SPACES["categorical"], (8,)).to(DT)
    batch = _batch(actor, "categorical", seed=0)
    for extra in ({"cg_rtol": 1e-3}, {"fvp_fraction": 0.5}):
        assert cuda_graphs.graphed_policy_step(actor, batch, STEP | extra) is None
    assert emulated == []


def test_failed_recording_warns_once_and_runs_eagerly(monkeypatch):
    def broken(fn, device, leaves):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "record", broken)
    monkeypatch.setattr(cuda_graphs, "_CACHE", type(cuda_graphs._CACHE)())
    monkeypatch.setattr(cuda_graphs, "_FAILED", set())
    torch.manual_seed(0)
    actor = make_actor(OBS, SPACES["categorical"], (8,)).to(DT)
    ref = copy.deepcopy(actor)
    batch = _batch(actor, "categorical", seed=0)
    with pytest.warns(RuntimeWarning, match="CUDA graph recording failed"):
        got = policy_step(actor, batch, cuda_graph=True, **STEP)
    assert got == policy_step(ref, batch, **STEP)
    assert torch.equal(_flat(actor), _flat(ref))


def test_graphed_critic_fit_equals_the_eager_fit_and_carries_adam_state(emulated):
    torch.manual_seed(0)
    critic = make_critic(OBS, (16, 16)).to(DT)
    ref = copy.deepcopy(critic)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    for update in range(3):
        gen = torch.Generator().manual_seed(update)
        obs = torch.randn(100, 3, generator=gen, dtype=DT)
        returns = obs.sum(-1) ** 2
        kwargs = dict(epochs=2, minibatch_size=32)
        got = fit_critic(
            critic,
            opt,
            obs,
            returns,
            generator=torch.Generator().manual_seed(update),
            cuda_graph=True,
            **kwargs,
        )
        want = fit_critic(
            ref, ref_opt, obs, returns, generator=torch.Generator().manual_seed(update), **kwargs
        )
        assert got == want
        assert torch.equal(_flat(critic), _flat(ref))
        for p, q in zip(critic.parameters(), ref.parameters()):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
    assert len(emulated) == 1


def test_recorded_computations_never_read_the_device(monkeypatch):
    # What a graph records must not sync: the policy step with the batched line search
    # (forced on CPU) and fixed-iteration CG, and the critic's minibatch loop.
    monkeypatch.setattr(update_module, "line_search_batched", lambda device: True)
    for family in SPACES:
        torch.manual_seed(0)
        actor = make_actor(OBS, SPACES[family], (8,)).to(DT)
        batch = _batch(actor, family, seed=0)
        # The first step checks the written-out actor forward once (a host read), as the
        # eager warm-up before a recording does.
        with _NoHostSync(), pytest.raises(RuntimeError, match="host sync"):
            policy_step_tensors(actor, batch, **STEP)
        policy_step_tensors(actor, batch, **STEP)
        with _NoHostSync():
            out = policy_step_tensors(actor, batch, **STEP)
        assert out.stats.shape == (12,) and bool(out.stats[0])  # accepted
    critic = make_critic(OBS, (16, 16)).to(DT)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    state = _FlatMLP(critic, opt)
    obs, returns = torch.randn(64, 3, dtype=DT), torch.randn(64, dtype=DT)
    idx = torch.stack([torch.randperm(64) for _ in range(2)])
    with _NoHostSync():
        total = _minibatch_loop(state, obs, returns, idx, 16)
    assert total.shape == () and float(total) > 0
    # The guard itself detects a sync (it can fail).
    with _NoHostSync(), pytest.raises(RuntimeError, match="host sync"):
        float(total)
