"""Env construction for training and evaluation: one place that resolves an env id, imports
the module of a ``"module:Env-v0"`` id, and flattens Dict/Tuple observations (one-hot encodes
Discrete/MultiDiscrete ones, e.g. Taxi's state index).

* **Ids**: a registered gymnasium id (``"CartPole-v1"``), or ``"module:Env-v0"``: as
  :func:`gymnasium.make` does, ``module`` is imported first (it registers ``Env-v0``). Importing
  runs the module's code, so an id *read from a run directory* someone else may have written
  is only resolved with ``allow_import=True`` (see :mod:`trpo.evaluation`); an id the user
  typed is theirs to run.
* **Observations**: the policies take flat vectors. A ``Dict`` or ``Tuple`` observation space
  is flattened with :class:`gymnasium.wrappers.FlattenObservation` (a one-line notice on
  stderr says so), in training and evaluation alike, so a checkpoint always sees the same
  features in the same order.

Example:
    >>> env = make_env("CartPole-v1")
    >>> env.observation_space.shape
    (4,)
    >>> env.close()
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
from gymnasium.spaces import Dict as DictSpace
from gymnasium.spaces import Discrete, MultiDiscrete
from gymnasium.spaces import Tuple as TupleSpace
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.wrappers import FlattenObservation

from trpo.envpool_env import EnvPoolVectorEnv, resolve_env_backend

__all__ = ["FlatNested", "env_module", "make_env", "make_envs", "resolve_env_id"]

_NESTED = (DictSpace, TupleSpace, Discrete, MultiDiscrete)  # Discrete ones become one-hot


def env_module(env_id: str) -> str | None:
    """The module a ``"module:Env-v0"`` id imports, or None for a plain registered id."""
    return env_id.split(":", 1)[0] if ":" in env_id else None


def resolve_env_id(env_id: str, *, allow_import: bool = True) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``, importing the module of a ``"module:Env-v0"`` id.

    Args:
        env_id: a gymnasium id, optionally prefixed with ``module:``.
        allow_import: if False, a ``module:`` id is refused instead of imported.

    Raises:
        ValueError: the id is not registered (after the import), its module cannot be
            imported (naming the error it raised), or ``allow_import`` is False.
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id must be a non-empty string (got {env_id!r})")
    module = env_module(env_id)
    name = env_id.split(":", 1)[1] if module is not None else env_id
    if module is not None:
        if not allow_import:
            raise ValueError(
                f"env_id {env_id!r} would import the Python module {module!r} (running its "
                "code); it is not imported unless explicitly allowed"
            )
        try:
            importlib.import_module(module)
        except Exception as e:  # the module's own code may raise anything
            raise ValueError(
                f"env_id {env_id!r}: importing module {module!r} failed "
                f"({type(e).__name__}: {e}); check that it is on PYTHONPATH"
            ) from None
    try:
        return gym.spec(name)
    except gym.error.Error as e:
        raise ValueError(
            f"unknown env_id {env_id!r} ({e}); list the registered ids with "
            f"`python -c 'import gymnasium; gymnasium.pprint_registry()'`"
        ) from None


class FlatNested(gym.spaces.Box):
    """The flattened Box of a Dict/Tuple observation space that remembers it (``nested``), so
    that the networks can cut image parts back out (:func:`trpo.networks.image_parts`)."""

    def __init__(self, nested: gym.Space):
        flat = gym.spaces.flatten_space(nested)
        super().__init__(flat.low, flat.high, dtype=flat.dtype)
        self.nested = nested


class _FlattenNested:
    """Wrapper factory: flatten a Dict/Tuple observation space, record that it did."""

    def __init__(self) -> None:
        self.flattened: list[gym.Space] = []

    def __call__(self, env: gym.Env) -> gym.Env:
        if isinstance(env.observation_space, _NESTED):
            self.flattened.append(env.observation_space)
            flat = FlattenObservation(env)
            flat.observation_space = FlatNested(env.observation_space)
            return flat
        return env

    def notice(self, env_id: str, flat: gym.Space) -> None:
        if self.flattened:
            kind = type(self.flattened[0]).__name__
            print(
                f"notice: {env_id} has a {kind} observation space; it is flattened with "
                f"gymnasium.wrappers.FlattenObservation into {flat.shape[0]} features",
                file=sys.stderr,
            )


def make_env(
    env_id: str,
    *,
    render_mode: str | None = None,
    allow_import: bool = True,
    env_kwargs: dict[str, Any] | None = None,
    notice: bool = True,
) -> gym.Env:
    """One env of ``env_id`` (Dict/Tuple observations flattened, see the module docstring;
    ``notice=False`` leaves the one-line notice to whoever made the training envs).

    Raises:
        ValueError: see :func:`resolve_env_id`.
    """
    spec = resolve_env_id(env_id, allow_import=allow_import)
    flatten = _FlattenNested()
    kwargs = dict(env_kwargs or {})
    if render_mode is not None:  # envs without a render_mode argument accept no None either
        kwargs["render_mode"] = render_mode
    env = flatten(gym.make(spec, **kwargs))
    if notice:
        flatten.notice(env_id, env.observation_space)
    return env


def make_envs(
    env_id: str,
    n_envs: int,
    *,
    async_: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    wrappers: Sequence[Callable[[gym.Env], gym.Wrapper]] | None = None,
    backend: str = "gymnasium",
    num_threads: int = 0,
) -> VectorEnv:
    """Create ``n_envs`` copies of ``env_id`` as one same-step-autoreset vector env.

    The envs are not reset here: :func:`trpo.rollout.init_rollout_state` resets env ``i``
    with seed ``seed + i``.

    Args:
        env_id: A registered gymnasium id, e.g. ``"CartPole-v1"``, or ``"module:Env-v0"``
            (``module`` is imported first, as :func:`gymnasium.make` does).
        n_envs: Number of parallel envs ``N`` (≥ 1).
        async_: gymnasium: one subprocess per env (``AsyncVectorEnv``) instead of stepping
            them in this process; pays off only for expensive envs. envpool: two pools that
            :func:`trpo.rollout.collect_rollout` steps in alternation, overlapping the policy
            of one half of the envs with the simulation of the other (``n_envs`` ≥ 2).
        env_kwargs: Keyword arguments for the env constructor.
        wrappers: Wrappers applied to each single env (after Dict/Tuple flattening).
        backend: ``"gymnasium"``, ``"envpool"`` (:class:`trpo.envpool_env.EnvPoolVectorEnv`,
            same semantics; no ``wrappers``) or ``"auto"``
            (:func:`trpo.envpool_env.resolve_env_backend`).
        num_threads: envpool's worker threads (0 = its default); unused by gymnasium.

    Returns:
        A :class:`gymnasium.vector.VectorEnv`.

    Raises:
        ValueError: If ``env_id`` is not registered (with how to list the ids) or its
            module cannot be imported, or ``n_envs`` is not positive, or envpool was asked
            for an id it lacks, or with ``wrappers``.
        trpo.envpool_env.EnvPoolUnavailable: envpool was asked for and is not installed.
    """
    if not isinstance(n_envs, int) or isinstance(n_envs, bool) or n_envs <= 0:
        raise ValueError(f"n_envs must be a positive int, got {n_envs!r}")
    if resolve_env_backend(backend, env_id) == "envpool":
        if wrappers:
            raise ValueError("the envpool backend takes no wrappers: use env_backend 'gymnasium'")
        if async_ and n_envs < 2:
            raise ValueError("async_envs on envpool steps two halves of the envs: n_envs >= 2")
        return EnvPoolVectorEnv(
            env_id, n_envs, num_threads=num_threads, env_kwargs=env_kwargs, pipelined=async_
        )
    resolve_env_id(env_id)
    # Called in this process for each sync env, and for the probe env that AsyncVectorEnv
    # builds here to learn the spaces, so the notice is printed in both modes.
    flatten = _FlattenNested()
    envs = gym.make_vec(
        env_id,
        num_envs=n_envs,
        vectorization_mode="async" if async_ else "sync",
        # copy=False: the collector copies each step's arrays into its own buffers at once.
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP, "copy": False},
        wrappers=[flatten, *(wrappers or ())],
        **(env_kwargs or {}),
    )
    flatten.notice(env_id, envs.single_observation_space)
    return envs
