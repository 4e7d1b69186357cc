"""Problems shared by the benchmark suites: Gaussian MLP policies of RL sizes on CPU or CUDA.

Sizes (``obs-hidden-hidden-act``, tanh, state-independent log σ), named by the MuJoCo task
they fit, and batches of states:

=============  ====================  =========================================
name           layers                task
=============  ====================  =========================================
``hopper``     11-64-64-3            Hopper
``cheetah``    17-64-64-6            HalfCheetah / Walker2d
``humanoid``   376-256-256-17        Humanoid
``huge``       376-2048-2048-17      a large policy (GPU only, batch 200k)
=============  ====================  =========================================

A case is ``"<size>@<batch>"`` with batches ``2k`` (2,048: SB3's ``n_steps``), ``25k``,
``50k`` and ``200k``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

__all__ = [
    "BATCHES",
    "CASES",
    "SIZES",
    "PolicyProblem",
    "TRPOProblem",
    "make_policy_problem",
    "make_sb3_trpo",
    "make_trpo_problem",
    "parse_case",
    "synced",
]

SIZES: dict[str, tuple[int, tuple[int, ...], int]] = {
    "hopper": (11, (64, 64), 3),
    "cheetah": (17, (64, 64), 6),
    "humanoid": (376, (256, 256), 17),
    "huge": (376, (2048, 2048), 17),
}
BATCHES = {"2k": 2048, "25k": 25_000, "50k": 50_000, "200k": 200_000}
CASES = [f"{s}@{b}" for s in ("hopper", "cheetah", "humanoid") for b in ("2k", "25k", "50k")]
CASES.append("huge@200k")


def parse_case(case: str) -> tuple[int, tuple[int, ...], int, int]:
    """``(obs_dim, hidden, act_dim, batch)`` of a case name."""
    size, batch = case.split("@")
    obs_dim, hidden, act_dim = SIZES[size]
    return obs_dim, hidden, act_dim, BATCHES[batch]


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so wall time covers the queued work."""
    if torch.device(device).type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


@dataclass
class PolicyProblem:
    """A Gaussian MLP policy with a batch, as pure functions of a parameter dict."""

    net: torch.nn.Sequential
    params: dict[str, Tensor]
    obs: Tensor
    actions: Tensor
    advantages: Tensor
    targets: Tensor
    dist_old: tuple[Tensor, Tensor]
    log_prob_old: Tensor
    device: torch.device

    def dist(self, p: dict[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = functional_call(self.net, {k: v for k, v in p.items() if k != "log_std"}, (obs,))
        return mean, p["log_std"]

    def mean_fn(self, p: dict[str, Tensor], obs: Tensor) -> Tensor:
        return functional_call(self.net, p, (obs,))

    def log_prob(self, p: dict[str, Tensor], obs: Tensor, act: Tensor) -> Tensor:
        mean, log_std = self.dist(p, obs)
        return (-0.5 * ((act - mean) * torch.exp(-log_std)) ** 2 - log_std).sum(-1)

    def surrogate(self, p: dict[str, Tensor]) -> Tensor:
        ratio = torch.exp(self.log_prob(p, self.obs, self.actions) - self.log_prob_old)
        return (ratio * self.advantages).mean()

    def mean_kl(self, p: dict[str, Tensor], obs: Tensor) -> Tensor:
        mean_old, log_std_old = self.dist_old
        mean, log_std = self.dist(p, obs)
        var_ratio = torch.exp(2 * (log_std_old - log_std))
        kl = (
            log_std
            - log_std_old
            + 0.5 * (var_ratio + (mean_old - mean) ** 2 * torch.exp(-2 * log_std))
            - 0.5
        )
        return kl.sum(-1).mean()


def make_policy_problem(case: str, device: str | torch.device, seed: int = 0) -> PolicyProblem:
    """The float32 policy problem of ``case`` on ``device``."""
    obs_dim, hidden, act_dim, batch = parse_case(case)
    device = torch.device(device)
    torch.manual_seed(seed)
    net = _mlp([obs_dim, *hidden, act_dim]).to(device)
    params = {k: v.detach() for k, v in net.named_parameters()}
    params["log_std"] = torch.full((act_dim,), -0.5, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    obs = torch.randn(batch, obs_dim, generator=gen, device=device)
    prob = PolicyProblem(
        net=net,
        params=params,
        obs=obs,
        actions=obs.new_empty(0),
        advantages=torch.randn(batch, generator=gen, device=device),
        targets=torch.randn(batch, act_dim, generator=gen, device=device),
        dist_old=(obs.new_empty(0), obs.new_empty(0)),
        log_prob_old=obs.new_empty(0),
        device=device,
    )
    with torch.no_grad():
        mean, log_std = prob.dist(params, obs)
        prob.dist_old = (mean.clone(), log_std.clone())
        noise = torch.randn(mean.shape, generator=gen, device=device)
        prob.actions = mean + torch.exp(log_std) * noise
        prob.log_prob_old = prob.log_prob(params, obs, prob.actions)
    return prob


@dataclass
class TRPOProblem:
    """This project's actor/critic/optimiser and a batch, with a reset to the start state."""

    actor: Any
    critic: Any
    optimizer: torch.optim.Optimizer
    batch: Any
    returns: Tensor
    device: torch.device
    _start: tuple[dict, dict, dict] | None = None

    def save(self) -> None:
        self._start = tuple(
            _clone(m.state_dict()) for m in (self.actor, self.critic, self.optimizer)
        )

    def reset(self) -> None:
        actor, critic, opt = self._start
        self.actor.load_state_dict(actor)
        self.critic.load_state_dict(critic)
        self.optimizer.load_state_dict(_clone(opt))


def _clone(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def _box(dim: int) -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, (dim,), dtype=np.float32)


def make_trpo_problem(case: str, device: str | torch.device, seed: int = 0) -> TRPOProblem:
    """``trpo.policy`` actor and critic of the case's size, on a random batch (float32)."""
    from trpo.policy import make_actor, make_critic
    from trpo.update import PolicyBatch

    obs_dim, hidden, act_dim, batch = parse_case(case)
    device = torch.device(device)
    torch.manual_seed(seed)
    act_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), dtype=np.float32)
    actor = make_actor(_box(obs_dim), act_space, hidden).to(device)
    critic = make_critic(_box(obs_dim), hidden).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    obs = torch.randn(batch, obs_dim, generator=gen, device=device)
    with torch.no_grad():
        mean, log_std = actor(obs)
        actions = mean + torch.exp(log_std) * torch.randn(mean.shape, generator=gen, device=device)
    adv = torch.randn(batch, generator=gen, device=device)
    prob = TRPOProblem(
        actor=actor,
        critic=critic,
        optimizer=torch.optim.Adam(critic.parameters(), lr=1e-3),
        batch=PolicyBatch(obs=obs, actions=actions, advantages=(adv - adv.mean()) / adv.std()),
        returns=torch.randn(batch, generator=gen, device=device),
        device=device,
    )
    prob.save()
    return prob


class _SpacesOnly(gym.Env):
    """An env that only carries spaces: SB3 needs one to build its model (never stepped)."""

    def __init__(self, obs_dim: int, act_dim: int):
        self.observation_space = _box(obs_dim)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        raise RuntimeError("never stepped")


def make_sb3_trpo(case: str, device: str | torch.device, seed: int = 0, **kwargs: Any):
    """sb3-contrib TRPO (defaults: 15 CG steps, 10 critic epochs of 128) with its rollout
    buffer filled with a random batch of the case's size, ready for ``model.train()``.

    Returns ``(model, timer)``: ``timer["splits"]`` collects, per ``train()`` call made through
    ``timer["train"]``, the seconds of the policy step and of the critic loop.
    """
    from sb3_contrib import TRPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv

    obs_dim, hidden, act_dim, batch = parse_case(case)
    env = DummyVecEnv([lambda: _SpacesOnly(obs_dim, act_dim)])
    model = TRPO(
        "MlpPolicy",
        env,
        n_steps=batch,
        seed=seed,
        device=str(device),
        policy_kwargs=dict(net_arch=dict(pi=list(hidden), vf=list(hidden))),
        **kwargs,
    )
    model.set_logger(configure(None, [""]))
    buf = model.rollout_buffer
    rng = np.random.default_rng(seed)
    buf.reset()
    buf.observations[:] = rng.standard_normal(buf.observations.shape, dtype=np.float32)
    buf.actions[:] = rng.standard_normal(buf.actions.shape, dtype=np.float32)
    buf.advantages[:] = rng.standard_normal(buf.advantages.shape, dtype=np.float32)
    buf.returns[:] = rng.standard_normal(buf.returns.shape, dtype=np.float32)
    buf.values[:] = 0.0
    with torch.no_grad():
        obs_t = torch.as_tensor(buf.observations.reshape(batch, -1), device=model.device)
        act_t = torch.as_tensor(buf.actions.reshape(batch, -1), device=model.device)
        _, log_prob, _ = model.policy.evaluate_actions(obs_t, act_t)
    buf.log_probs[:] = log_prob.cpu().numpy().reshape(buf.log_probs.shape)
    buf.full = True
    start = _clone(model.policy.state_dict()), _clone(model.policy.optimizer.state_dict())
    timer: dict[str, Any] = {"splits": [], "critic_start": None}
    get = buf.get

    def timed_get(batch_size=None):
        if batch_size is not None and timer["critic_start"] is None:
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            timer["critic_start"] = time.perf_counter()
        return get(batch_size)

    buf.get = timed_get

    def reset() -> None:
        model.policy.load_state_dict(start[0])
        model.policy.optimizer.load_state_dict(_clone(start[1]))

    def train() -> None:
        timer["critic_start"] = None
        t0 = time.perf_counter()
        model.train()
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t1 = time.perf_counter()
        split = timer["critic_start"] or t1
        timer["splits"].append((split - t0, t1 - split))

    timer["train"], timer["reset"] = train, reset
    return model, timer


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])
