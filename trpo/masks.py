"""Action masks (Discrete, MultiDiscrete): where they come from (docs/policies.md).

``info["action_mask"]`` of ``reset``/``step`` or an env method ``action_masks()`` (sb3-contrib),
``K`` or ``ΣK_i`` booleans (the heads' masks concatenated, or a tuple of them). Config field
``action_masks``: ``"auto"`` (where provided), ``"on"`` (required), ``"off"``.
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
        # Asked with has_wrapper_attr: a missing attribute raised in a subprocess env would
        # end that worker. A vector env without gymnasium's call() has no masks by method.
        try:
            return all(env.call("has_wrapper_attr", "action_masks"))
        except Exception:
            return False
    return env.has_wrapper_attr("action_masks")


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
