"""envpool (a C++ thread pool of envs) as a trpo vector env, with trpo's autoreset convention.

envpool steps ``N`` envs on its own threads, several times faster than gymnasium's vector envs
for cheap simulators (classic control, MuJoCo). Its convention differs from the one
:mod:`trpo.rollout` consumes, and :class:`EnvPoolVectorEnv` maps one onto the other:

==========================  ==========================================  ===========================
                            envpool (next-step autoreset)               trpo (same-step autoreset)
==========================  ==========================================  ===========================
episode of env i ends at t  ``obs[i]`` is the final observation         ``obs[i]`` is the first
                                                                        observation of the next
                                                                        episode; the final one is
                                                                        ``infos["final_obs"][i]``
step t + 1 of env i         action ignored, returns the reset obs,      a real transition
                            reward 0 (a fake "reset transition")
seeding                     at construction: env i gets ``seed + i``    ``reset(seed=[s_0..s_N-1])``
==========================  ==========================================  ===========================

So when envs end an episode in ``step``, the adapter keeps their final observations and resets
exactly those envs at once (``pool.reset(env_ids)``, one extra round trip to the thread pool,
only on steps where an episode ended); no transition crosses a reset, a truncated episode
bootstraps from its true final observation, and a terminated one does not (the rollout's GAE
decides that from the flags). envpool fixes seeds at construction, so a ``reset(seed=...)``
re-creates the pool with those seeds (~30 ms; not when the pool was just made with them).

envpool is optional (``pip install -e '.[envpool]'``): without it, ``"envpool"`` raises
:class:`EnvPoolUnavailable`; ``"auto"`` falls back to gymnasium.

Example:
    >>> resolve_env_backend("gymnasium", "CartPole-v1")
    'gymnasium'
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

__all__ = [
    "BACKENDS",
    "INSTALL_HINT",
    "EnvPoolUnavailable",
    "EnvPoolVectorEnv",
    "import_envpool",
    "resolve_env_backend",
]

BACKENDS = ("gymnasium", "envpool", "auto")
"""Values of ``TRPOConfig.env_backend``."""
INSTALL_HINT = "pip install -e '.[envpool]'"


class EnvPoolUnavailable(ValueError, ImportError):
    """``env_backend="envpool"`` was asked for, but the envpool package cannot be imported."""


def import_envpool() -> ModuleType:
    """The envpool module.

    Raises:
        EnvPoolUnavailable: it is not installed (or fails to import), naming the extra.
    """
    try:
        return importlib.import_module("envpool")
    except ImportError as e:
        raise EnvPoolUnavailable(
            f"env_backend 'envpool' needs the envpool package ({type(e).__name__}: {e}); "
            f"install it with: {INSTALL_HINT}  (or use --env-backend gymnasium)"
        ) from None


def _check_listed(envpool: ModuleType, env_id: str) -> None:
    ids = envpool.list_all_envs()
    if env_id not in ids:
        close = difflib.get_close_matches(env_id, ids, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"env_id {env_id!r} is not an envpool env.{hint} envpool.list_all_envs() lists "
            "them; use --env-backend gymnasium (or auto) for this env"
        )


def resolve_env_backend(backend: str, env_id: str) -> str:
    """The backend that runs ``env_id``: ``"gymnasium"`` or ``"envpool"``.

    ``"auto"`` is envpool when it is importable and lists ``env_id``, else gymnasium.

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`, or ``"envpool"`` was asked for
            an id envpool does not list.
        EnvPoolUnavailable: ``"envpool"`` was asked for and envpool is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"env_backend must be one of {BACKENDS} (got {backend!r})")
    if backend == "gymnasium":
        return backend
    if backend == "auto":
        try:
            envpool = import_envpool()
        except EnvPoolUnavailable:
            return "gymnasium"
        return "envpool" if env_id in envpool.list_all_envs() else "gymnasium"
    _check_listed(import_envpool(), env_id)
    return "envpool"


class EnvPoolVectorEnv(VectorEnv):
    """``N`` envpool envs behind gymnasium's ``VectorEnv`` API, in same-step autoreset mode.

    ``step(actions (N, *act_shape))`` returns ``(obs (N, *obs_shape), rewards (N,),
    terminations (N,), truncations (N,), infos)``; where an episode ended, ``obs[i]`` is already
    the first observation of the next one and ``infos["final_obs"][i]`` (an ``(N, *obs_shape)``
    array, rows valid where the mask ``infos["_final_obs"]`` is set) the true final one. The
    infos hold nothing else (:func:`trpo.rollout.collect_rollout` computes episode statistics
    from the rewards and flags).

    With ``pipelined=True`` the envs are two pools, :attr:`groups` ``[0, N//2)`` and
    ``[N//2, N)``, each stepped in two phases, :meth:`send` then :meth:`recv`, so that one half
    simulates while the policy acts for the other (:func:`trpo.rollout.collect_rollout` does
    this); seeds, semantics and ``step`` are the same as with one pool.

    Args:
        env_id: an id of ``envpool.list_all_envs()``.
        num_envs: ``N`` ≥ 1 (≥ 2 when pipelined).
        num_threads: envpool worker threads per pool; 0 = envpool's default (``min(envs, cores)``).
        seed: env ``i`` is seeded with ``seed + i`` until a ``reset(seed=...)``.
        env_kwargs: passed to ``envpool.make`` (e.g. ``max_episode_steps``).
        pipelined: two pools stepped in alternation (see above).

    Raises:
        EnvPoolUnavailable: envpool is not installed.
        ValueError: ``env_id`` is not an envpool env, a bad count, or a Dict/Tuple
            observation space (use the gymnasium backend, which flattens them).
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        *,
        num_threads: int = 0,
        seed: int = 0,
        env_kwargs: dict[str, Any] | None = None,
        pipelined: bool = False,
    ) -> None:
        low_envs = 2 if pipelined else 1
        for name, value, low in (("num_envs", num_envs, low_envs), ("num_threads", num_threads, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int ≥ {low} (got {value!r})")
        self._envpool = import_envpool()
        _check_listed(self._envpool, env_id)
        self._kwargs = dict(env_kwargs or {}, num_threads=num_threads)
        self.num_envs, self.spec = num_envs, EnvSpec(id=env_id)
        half = num_envs // 2
        self.groups = (slice(0, half), slice(half, num_envs)) if pipelined else (slice(0, None),)
        self._pools: list[Any] = []
        self._seeds: list[int] = []
        self._make_pools([seed + i for i in range(num_envs)])
        if isinstance(self.single_observation_space, (gym.spaces.Dict, gym.spaces.Tuple)):
            self.close()
            raise ValueError(
                f"{env_id} has a {type(self.single_observation_space).__name__} observation "
                "space; use --env-backend gymnasium, which flattens it"
            )
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    def _make_pools(self, seeds: list[int]) -> None:
        """(Re-)create the pools with env ``i`` seeded ``seeds[i]``."""
        self.close_extras()
        for rows in self.groups:
            part = seeds[rows]
            arithmetic = all(s == part[0] + i for i, s in enumerate(part))
            # `env_seed` (a per-env list) is newer than `seed`; use it only when it is needed.
            seeding = {"seed": part[0]} if arithmetic else {"env_seed": part}
            with warnings.catch_warnings():  # envpool's float64 bounds of float32 Boxes
                warnings.filterwarnings("ignore", ".*precision lowered", UserWarning)
                pool = self._envpool.make(
                    self.spec.id,
                    env_type="gymnasium",
                    num_envs=len(part),
                    **self._kwargs,
                    **seeding,
                )
                self.single_observation_space = pool.observation_space
                self.single_action_space = pool.action_space
            self._pools.append(pool)
        self._seeds, self._fresh = list(seeds), True

    def reset(
        self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env: ``seed`` an int (env ``i`` gets ``seed + i``) or a list of ``N``
        seeds (re-seeds, as gymnasium does), or None (continues the envs' random streams).

        Returns:
            ``(obs (N, *obs_shape), {})``.
        """
        if options:
            raise ValueError(f"EnvPoolVectorEnv.reset takes no options (got {options!r})")
        if seed is not None:
            seeds = [int(seed) + i for i in range(self.num_envs)] if np.isscalar(seed) else seed
            seeds = [int(s) for s in seeds]
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset needs {self.num_envs} seeds (got {len(seeds)})")
            if seeds != self._seeds or not self._fresh:  # a fresh pool is already seeded
                self._make_pools(seeds)
        self._fresh = False
        return np.concatenate([np.array(pool.reset()[0]) for pool in self._pools]), {}

    def send(self, group: int, actions: np.ndarray) -> None:
        """Start one step of the envs of ``groups[group]`` (``actions`` their rows); returns
        at once. Every :meth:`send` is followed by the :meth:`recv` of its group."""
        self._pools[group].send(np.asarray(actions))

    def recv(self, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait for the step of ``groups[group]`` sent last: ``(obs, rewards, terminations,
        truncations, {row in the group: final obs})``, rows of that group, same-step autoreset.
        """
        pool = self._pools[group]
        obs, rewards, terminations, truncations, _ = pool.recv()
        done = np.logical_or(terminations, truncations)
        if not done.any():
            return obs, rewards, terminations, truncations, {}
        ids = np.flatnonzero(done).astype(np.int32)
        # Copies first: the reset's results may reuse the buffers these arrays view.
        obs, rewards = np.array(obs, copy=True), np.array(rewards, copy=True)
        terminations, truncations = np.array(terminations), np.array(truncations)
        finals = {int(i): obs[i].copy() for i in ids}
        reset_obs, info = pool.reset(ids)
        obs[np.asarray(info.get("env_id", ids))] = reset_obs
        return obs, rewards, terminations, truncations, finals

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One step of every env, same-step autoreset (see the class docstring)."""
        actions = np.asarray(actions)
        for g, rows in enumerate(self.groups):
            self.send(g, actions[rows])
        parts = [self.recv(g) for g in range(len(self.groups))]
        if len(parts) == 1:
            obs, rewards, terminations, truncations, finals = parts[0]
        else:
            obs, rewards, terminations, truncations = (
                np.concatenate(x) for x in zip(*(p[:4] for p in parts))
            )
            finals = {
                rows.indices(self.num_envs)[0] + i: f
                for rows, p in zip(self.groups, parts)
                for i, f in p[4].items()
            }
        if not finals:
            return obs, rewards, terminations, truncations, {}
        final, mask = np.zeros_like(obs), np.zeros(self.num_envs, dtype=np.bool_)
        for i, f in finals.items():
            final[i], mask[i] = f, True
        return obs, rewards, terminations, truncations, {"final_obs": final, "_final_obs": mask}

    def close_extras(self, **kwargs: Any) -> None:
        for pool in self._pools:
            pool.close()
        self._pools = []
