"""Tests for natgrad.cuda_graph and its two users (the policy step, the critic fit), on CPU.

A CUDA graph replays recorded kernels on fixed memory, so what can go wrong lies in the
plumbing around it (new data copied into the static buffers, outputs read from the recorded
tensors, the cache, the optimiser state carried in and out) and in the recorded computation
being free of host syncs. Both are tested here without a GPU: the recorder is replaced by
``emulate_recording`` (replay = re-run on the static buffers, copy into the first run's
outputs), and :class:`natgrad.cuda_graph.NoHostSync` fails on every device-to-host read.
The reference is the eager step / fit on a deep copy. ``bench/gpu_check.sh`` runs the same
comparisons with real graphs.
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import trpo.update as update_module
from natgrad import cuda_graph
from natgrad.cuda_graph import NoHostSync
from natgrad.distributed import LOCAL
from natgrad.mlp import FlatMLP
from trpo.critic import CriticSettings, _epochs, _FusedTrainer, fit_critic
from trpo.policy import make_actor, make_critic, sample
from trpo.update import (
    PolicyBatch,
    PolicyStepSettings,
    graphed_policy_step,
    policy_step,
    policy_step_tensors,
)

DT = torch.float64
OBS = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float64)
SPACES = {
    "categorical": gym.spaces.Discrete(4),
    "diag_gaussian": gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float64),
}
STEP = PolicyStepSettings(max_kl=0.01, cg_iters=6, cg_damping=0.1, line_search_max_tries=5)
GRAPHED = PolicyStepSettings(**{**STEP.__dict__, "cuda_graph": True})


@pytest.fixture
def fresh_cache():
    cuda_graph.CACHE.clear()
    yield cuda_graph.CACHE
    cuda_graph.CACHE.clear()


@pytest.fixture
def emulated(monkeypatch, fresh_cache):
    """Record by emulation and count the recordings."""
    calls = []

    def counting(fn, device):
        calls.append(device)
        return cuda_graph.emulate_recording(fn, device)

    monkeypatch.setattr(cuda_graph, "recorder", counting)
    return calls


def _batch(actor, family, seed, n=48):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.rand(n, 3, generator=gen, dtype=DT) * 2 - 1
    with torch.no_grad():
        actions = sample(family, actor(obs), gen)
    return PolicyBatch(obs=obs, actions=actions, advantages=torch.randn(n, generator=gen, dtype=DT))


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ----------------------------------------------------------------- the generic part
def test_emulated_recording_replays_on_the_static_inputs(emulated):
    x = torch.arange(3.0)
    rec = cuda_graph.record(lambda: {"y": x * 2, "pair": (x.sum(), [x + 1])}, x.device)
    first = rec.outputs
    x.copy_(torch.tensor([5.0, 6.0, 7.0]))  # new data into the static input
    rec.replay()
    assert rec.outputs is first  # read from the first run's tensors, as from a graph
    assert first["y"].tolist() == [10.0, 12.0, 14.0]
    assert float(first["pair"][0]) == 18.0 and first["pair"][1][0].tolist() == [6.0, 7.0, 8.0]
    assert cuda_graph.recordable("cpu")  # emulated: anywhere


def test_real_recording_is_cuda_only():
    assert not cuda_graph.recordable("cpu")  # without the emulation


def test_cache_keys_owners_bounds_and_failures(fresh_cache):
    owner = torch.nn.Linear(1, 1)
    made = []
    for key in ("a", "a", "b", "c", "a"):
        fresh_cache.get(owner, (key,), lambda key=key: made.append(key) or key)
    assert made == ["a", "b", "c", "a"]  # at most 2 per owner: "a" dropped for "c"

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="CUDA graph recording failed"):
        assert fresh_cache.get(owner, ("bad",), broken) is None
    assert fresh_cache.get(owner, ("bad",), broken) is None  # once: no second warning


def test_no_host_sync_detects_syncs():
    x = torch.ones(3)
    with NoHostSync():
        y = (x * 2).sum()  # device-side work is fine
        for read in (lambda: y.item(), lambda: bool(y > 0), lambda: float(y)):
            with pytest.raises(RuntimeError, match="host sync"):
                read()


# ---------------------------------------------------------------- the policy step
@pytest.mark.parametrize("family", list(SPACES))
def test_graphed_policy_step_equals_the_eager_step_over_several_updates(family, emulated):
    torch.manual_seed(0)
    actor = make_actor(OBS, SPACES[family], (8,)).to(DT)
    ref = copy.deepcopy(actor)
    for update in range(3):  # new data every update, one recording
        batch = _batch(actor, family, seed=update)
        got = policy_step(actor, batch, GRAPHED)
        want = policy_step(ref, batch, STEP)
        assert got == want
        assert torch.equal(_flat(actor), _flat(ref))
    assert len(emulated) == 1
    # A rejected step (zero advantages: zero step) is replayed too: θ stays bit for bit.
    before = _flat(actor)
    batch = _batch(actor, family, seed=9)
    zero = PolicyBatch(batch.obs, batch.actions, torch.zeros_like(batch.advantages))
    rejected = policy_step(actor, zero, GRAPHED)
    assert not rejected.applied and rejected.status == "ZERO_GRADIENT"
    assert torch.equal(_flat(actor), before)
    assert len(emulated) == 1  # same shapes and settings: the same recording
    policy_step(actor, batch, PolicyStepSettings(**{**GRAPHED.__dict__, "max_kl": 0.02}))
    assert len(emulated) == 2  # other settings: another recording


def test_graphed_policy_step_declines_settings_that_sync(emulated):
    torch.manual_seed(0)
    actor = make_actor(OBS, SPACES["categorical"], (8,)).to(DT)
    batch = _batch(actor, "categorical", seed=0)
    for extra in ({"cg_rtol": 1e-3}, {"fvp_fraction": 0.5}):
        settings = PolicyStepSettings(**{**GRAPHED.__dict__, **extra})
        assert graphed_policy_step(actor, batch, settings) is None
    assert emulated == []


def test_failed_recording_warns_once_and_runs_eagerly(monkeypatch, fresh_cache):
    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "recorder", broken)
    torch.manual_seed(0)
    actor = make_actor(OBS, SPACES["categorical"], (8,)).to(DT)
    ref = copy.deepcopy(actor)
    batch = _batch(actor, "categorical", seed=0)
    with pytest.warns(RuntimeWarning, match="CUDA graph recording failed"):
        got = policy_step(actor, batch, GRAPHED)
    assert got == policy_step(ref, batch, STEP)
    assert torch.equal(_flat(actor), _flat(ref))


# ------------------------------------------------------------------ the critic fit
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
        got = fit_critic(
            critic,
            opt,
            obs,
            returns,
            CriticSettings(epochs=2, minibatch_size=32, cuda_graph=True),
            generator=torch.Generator().manual_seed(update),
        )
        want = fit_critic(
            ref,
            ref_opt,
            obs,
            returns,
            CriticSettings(epochs=2, minibatch_size=32),
            generator=torch.Generator().manual_seed(update),
        )
        assert got == want
        assert torch.equal(_flat(critic), _flat(ref))
        for p, q in zip(critic.parameters(), ref.parameters()):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
    assert len(emulated) == 1


# ------------------------------------------------------- what a graph records: no sync
def test_recorded_computations_never_read_the_device(monkeypatch):
    # The policy step with the batched line search (forced on CPU) and fixed-iteration CG,
    # and the critic's fused epochs.
    monkeypatch.setattr(update_module, "line_search_batched", lambda device: True)
    for family in SPACES:
        torch.manual_seed(0)
        actor = make_actor(OBS, SPACES[family], (8,)).to(DT)
        batch = _batch(actor, family, seed=0)
        # The first step checks the written-out actor forward once (a host read), as the
        # eager warm-up before a recording does.
        with NoHostSync(), pytest.raises(RuntimeError, match="host sync"):
            policy_step_tensors(actor, batch, STEP)
        policy_step_tensors(actor, batch, STEP)
        with NoHostSync():
            out = policy_step_tensors(actor, batch, STEP)
        assert out.stats.shape == (12,) and bool(out.stats[0])  # accepted
    critic = make_critic(OBS, (16, 16)).to(DT)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    trainer = _FusedTrainer(FlatMLP(list(critic.parameters()), opt), LOCAL)
    obs, returns = torch.randn(64, 3, dtype=DT), torch.randn(64, dtype=DT)
    perms = torch.stack([torch.randperm(64) for _ in range(2)])
    with NoHostSync(), torch.no_grad():
        total = _epochs(trainer, obs, returns, perms, [16] * 4, [16.0] * 4)
    assert total.shape == () and float(total) > 0
