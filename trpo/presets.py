"""Per-env starting points for :class:`trpo.config.TRPOConfig`, and :func:`config_for`.

Example:
    >>> from trpo.presets import config_for
    >>> config_for("Hopper-v5").cg_iters
    25
    >>> config_for("Hopper-v5", max_kl=0.02).max_kl
    0.02
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from trpo.config import TRPOConfig
from trpo.envpool_env import resolve_env_backend

__all__ = ["BACKEND_PRESETS", "PRESETS", "config_for"]

# Starting points from rl-baselines3-zoo's tuned TRPO hyperparameters (hyperparams/trpo.yml);
# zoo's `normalize: true` is obs + reward normalisation, `batch_size` is the critic minibatch.
# The scores they reach are in docs/benchmarks.md.
_MUJOCO: dict[str, Any] = dict(
    total_steps=1_000_000,
    n_envs=2,
    n_steps=1024,
    gamma=0.99,
    gae_lambda=0.95,
    max_kl=0.01,
    cg_iters=25,
    cg_damping=0.1,
    critic_lr=1e-3,
    critic_epochs=20,
    critic_minibatch_size=128,
    normalize_obs=True,
    normalize_reward=True,
)

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        # CartPole and Pendulum take the Fisher on a quarter of the batch (the paper's 0.1-0.2
        # is of larger batches), CartPole with 10 CG iterations: the policy step 2-4x cheaper,
        # evaluation returns unchanged (CartPole 500 on seeds 1-8, Pendulum over 3 seeds;
        # docs/benchmarks.md, "Issue 12: the fixed costs and the update, cut").
        "CartPole-v1": MappingProxyType(
            dict(
                total_steps=100_000,
                n_envs=2,
                n_steps=512,
                gamma=0.99,
                gae_lambda=0.98,
                cg_iters=10,
                cg_damping=1e-3,
                critic_lr=1e-3,
                critic_epochs=20,
                critic_minibatch_size=512,
                fvp_fraction=0.25,
            )
        ),
        # zoo's Pendulum uses gSDE; with plain Gaussian noise a larger batch and trust region
        # and a short horizon (γ = 0.9) are the usual remedy.
        "Pendulum-v1": MappingProxyType(
            dict(
                total_steps=200_000,
                n_envs=4,
                n_steps=512,
                gamma=0.9,
                gae_lambda=0.95,
                max_kl=0.03,
                cg_iters=15,
                cg_damping=0.1,
                critic_lr=1e-3,
                critic_epochs=20,
                critic_minibatch_size=256,
                normalize_obs=True,
                normalize_reward=True,
                fvp_fraction=0.25,
            )
        ),
        # Without normalisation Hopper learns 2.9x more by 100k steps and ends higher at 1M
        # (docs/benchmarks.md, "Learning per step on Hopper-v5").
        "Hopper-v5": MappingProxyType(
            {**_MUJOCO, "normalize_obs": False, "normalize_reward": False}
        ),
        # zoo tunes HalfCheetah with a wider trust region (target_kl 0.04). With σ = 1 at the
        # start, 2 of 3 seeds learned to gallop on their backs (~1,800); σ = e^-0.5 keeps all
        # four seeds tried upright, 4,119-6,566 (docs/benchmarks.md, "HalfCheetah's spread").
        "HalfCheetah-v5": MappingProxyType({**_MUJOCO, "max_kl": 0.04, "log_std_init": -0.5}),
        # σ = e^-0.5 at the start as well: 1M mean 4,201 (seeds 2,035 / 5,088 / 5,481) against
        # 3,289 with σ = 1, whose seed 3 collapsed to 623 (docs/benchmarks.md).
        "Walker2d-v5": MappingProxyType({**_MUJOCO, "log_std_init": -0.5}),
    }
)
"""Per-env overrides of the :class:`TRPOConfig` defaults, applied by :func:`config_for`."""


# envpool steps 8 envs on 2 threads at ~1.6x gymnasium's 2 (docs/envpool.md). The batch is
# the gymnasium preset's 2,048, so the policy is updated as often per env step (16 envs, a
# 4,096 batch, learned a third as much by 100k steps on Hopper); the update is trimmed to keep
# 1M steps near 2 minutes: the Fisher on a quarter of the batch and 10 critic epochs of 256 at
# twice the learning rate. Hopper 1M: 3,461 mean over seeds 1-5 in 112-120 s; 100k: 1,817
# (docs/benchmarks.md, "Issue 12, fourth pass", which also has HalfCheetah and Walker2d).
_ENVPOOL_MUJOCO: Mapping[str, Any] = MappingProxyType(
    dict(n_envs=8, n_steps=256, critic_epochs=10, critic_minibatch_size=256, critic_lr=2e-3,
         fvp_fraction=0.25)
)

BACKEND_PRESETS: Mapping[tuple[str, str], Mapping[str, Any]] = MappingProxyType(
    {
        ("Hopper-v5", "envpool"): _ENVPOOL_MUJOCO,
        ("HalfCheetah-v5", "envpool"): _ENVPOOL_MUJOCO,
        ("Walker2d-v5", "envpool"): _ENVPOOL_MUJOCO,
    }
)
"""Overrides of ``PRESETS[env_id]`` for one ``(env_id, env_backend)``: each backend's best
2-core configuration where it differs from the env's preset (measured in docs/benchmarks.md)."""


def config_for(env_id: str, **overrides: Any) -> TRPOConfig:
    """The config for ``env_id``: dataclass defaults < ``PRESETS[env_id]`` <
    ``BACKEND_PRESETS[env_id, backend]`` < ``overrides``.

    ``backend`` is ``overrides["env_backend"]`` (default ``"gymnasium"``), ``"auto"`` resolved
    by :func:`trpo.envpool_env.resolve_env_backend` (and saved resolved).

    Envs without a preset get the dataclass defaults. Only ``env_id`` and the ``overrides``
    count as given (:attr:`TRPOConfig.given_fields`), so ``config_for(env, resume=d,
    total_steps=n)`` continues ``d`` with its saved hyperparameters and ``n`` steps.

    Raises:
        ValueError: on an override that is not a field, or an invalid value.
    """
    names = {f.name for f in dataclasses.fields(TRPOConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown TRPOConfig field(s): {', '.join(unknown)}")
    if "env_id" in overrides and overrides["env_id"] != env_id:
        raise ValueError(f"env_id given twice: {env_id!r} and {overrides['env_id']!r}")
    backend = overrides.get("env_backend", TRPOConfig.env_backend)
    if backend == "auto":
        overrides = {**overrides, "env_backend": resolve_env_backend(backend, env_id)}
        backend = overrides["env_backend"]
    values = {
        **PRESETS.get(env_id, {}),
        **BACKEND_PRESETS.get((env_id, backend), {}),
        **overrides,
        "env_id": env_id,
    }
    return TRPOConfig(**values).with_given({*overrides, "env_id"})
