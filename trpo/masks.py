"""Action masks for Discrete and MultiDiscrete action spaces: where they come from.

An env provides the mask of its *current* state in ``info["action_mask"]`` of ``reset`` and
``step`` (gymnasium's Taxi, many game envs) or by a method ``action_masks()`` (sb3-contrib's
convention), as a boolean/0-1 array of ``K`` entries (``Discrete(K)``) or ``ΣK_i``
(``MultiDiscrete``, the heads' masks concatenated; a tuple of per-head arrays works too). The
config field ``action_masks`` chooses: ``"auto"`` uses them where the env provides them and the
action space is discrete, ``"on"`` requires them, ``"off"`` ignores them. The logits are masked
with :func:`natgrad.families.mask_logits` in sampling, log-probabilities, entropy, the KL and
the Fisher (:mod:`trpo.rollout`, :mod:`trpo.update`) and in evaluation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["MASK_MODES", "check_mask_space", "env_mask", "mask_source", "vector_masks"]

MASK_MODES = ("auto", "on", "off")
_DISCRETE = (gym.spaces.Discrete, gym.spaces.MultiDiscrete)


def check_mask_space(mode: str, action_space: gym.Space) -> None:
    """Raise if ``mode`` is ``"on"`` for an action space that has no discrete choices.

    Raises:
        ValueError: naming the space and the fix.
    """
    if mode == "on" and not isinstance(action_space, _DISCRETE):
        raise ValueError(
            f"action_masks='on' needs a Discrete or MultiDiscrete action space, got "
            f"{action_space}: masks choose among discrete actions; use action_masks='off'"
        )


def mask_source(mode: str, action_space: gym.Space, info: dict, env: Any) -> str | None:
    """``"info"``, ``"method"`` or ``None`` (no masks) for an env whose reset gave ``info``.

    ``env`` is a single env (the method looked up with ``get_wrapper_attr``) or a vector env
    (its sub-envs' method called through ``call``).

    Raises:
        ValueError: ``mode`` is ``"on"`` and the env provides no masks (or the space is not
            discrete), naming both sources.
    """
    check_mask_space(mode, action_space)
    if mode == "off" or not isinstance(action_space, _DISCRETE):
        return None
    if "action_mask" in info:
        return "info"
    if _has_method(env):
        return "method"
    if mode == "on":
        raise ValueError(
            "action_masks='on' but the env provides no action masks (no info['action_mask'] "
            "from reset and no action_masks() method); add one, or use action_masks='off'"
        )
    return None


def _has_method(env: Any) -> bool:
    if isinstance(env, gym.vector.VectorEnv):
        try:  # call() calls the sub-envs' method (get_attr would too): a missing one raises
            env.call("action_masks")
            return True
        except Exception:  # AttributeError, or its report from a subprocess
            return False
    try:
        return callable(env.get_wrapper_attr("action_masks"))
    except AttributeError:
        return False


def _flat(mask: Any) -> np.ndarray:
    if isinstance(mask, tuple):
        mask = np.concatenate([np.ravel(m) for m in mask])
    return np.asarray(mask).astype(np.bool_, copy=False)


def env_mask(env: gym.Env, info: dict, source: str) -> np.ndarray:
    """The ``(ΣK,)`` boolean mask of one env's current state."""
    return _flat(info["action_mask"] if source == "info" else env.get_wrapper_attr("action_masks")())


def vector_masks(envs: gym.vector.VectorEnv, infos: dict, source: str) -> np.ndarray:
    """The ``(N, ΣK)`` boolean masks of a vector env's current states."""
    if source == "info":
        masks = infos["action_mask"]
        return np.stack([_flat(m) for m in masks]) if isinstance(masks, tuple) else _flat(masks)
    return np.stack([_flat(m) for m in envs.call("action_masks")])
