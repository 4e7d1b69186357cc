"""Which networks a run trains, in one place shared by training, resuming and evaluation:
the user's modules, the factories named in the config, or the built-in MLP or CNN.

Precedence, per network: a module passed to ``train(config, actor=..., critic=...)``, else
``config.actor_factory`` / ``config.critic_factory`` (``"package.module:factory"``, called as
``factory(observation_space, action_space)``), else ``config.policy``: ``"mlp"``, ``"cnn"``
(:class:`NatureCNN`) or ``"auto"`` (the CNN for image observations, :func:`is_image`). Modules
and the CNN are wrapped by :class:`trpo.modules.ModuleActor` / :class:`~trpo.modules.ModuleCritic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from trpo.modules import ModuleActor, ModuleCritic, load_factory
from trpo.policy import Actor, Critic, action_family, make_actor, make_critic

__all__ = ["NatureCNN", "build_actor", "build_critic", "is_image"]


def is_image(space: gym.Space) -> bool:
    """An image observation space: a ``Box`` of shape ``(H, W, C)`` and dtype uint8."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


class NatureCNN(nn.Module):
    """``(B, H, W, C)`` images with values in [0, 255] → ``(B, out)``.

    ``x / 255``, channels first, then the convolutions of Mnih et al. (2015) (32 8×8 /4, 64 4×4
    /2, 64 3×3 /1, a 512-wide linear layer; ReLU) for images of at least 36×36, or two 3×3
    convolutions (16, 32) and a 128-wide layer for small ones (MinAtar's 10×10), then an MLP of
    ``hidden`` widths with ``activation`` and the output layer. Orthogonal init (gain √2, the
    output ``last_gain``), zero biases.
    """

    def __init__(
        self, shape: Sequence[int], out: int, hidden: Sequence[int], activation: str,
        last_gain: float,
    ):
        super().__init__()
        H, W, C = shape
        big = min(H, W) >= 36
        convs, c = [], C
        for width, k, stride in [(32, 8, 4), (64, 4, 2), (64, 3, 1)] if big else [(16, 3, 1), (32, 3, 1)]:
            convs += [nn.Conv2d(c, width, k, stride), nn.ReLU()]
            c = width
        features = math.prod(nn.Sequential(*convs)(torch.zeros(1, C, H, W)).shape)
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        sizes, layers = [features, 512 if big else 128, *hidden], [*convs, nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU() if a == features else act()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], out))
        for m in self.net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight, last_gain if m is self.net[-1] else math.sqrt(2))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.movedim(-1, -3) / 255.0)


def _builtin(config: Any, obs_space: gym.Space, out: int, last_gain: float) -> nn.Module | None:
    """The CNN module if ``config.policy`` asks for one here, else None (the MLP)."""
    image = is_image(obs_space)
    if config.policy == "cnn" and not image:
        raise ValueError(
            f"policy='cnn' needs image observations (a uint8 Box of shape (H, W, C)), got "
            f"{obs_space}; use --policy mlp (or auto)"
        )
    if config.policy == "mlp" or not image:
        return None
    if config.normalize_obs:
        raise ValueError(
            "the CNN scales uint8 images by 1/255; normalize_obs would standardise them "
            "first: turn normalize_obs off (or use --policy mlp)"
        )
    return NatureCNN(obs_space.shape, out, config.hidden_sizes, config.activation, last_gain)


def build_actor(
    config: Any, observation_space: gym.Space, action_space: gym.Space,
    module: nn.Module | None = None,
) -> Actor | ModuleActor:
    """The actor of ``config`` for single-env spaces (module docstring).

    Raises:
        ValueError: an unsupported space or policy for it, a factory that cannot be imported,
            or a module that breaks the protocol (:class:`trpo.modules.ModuleProtocolError`).
    """
    if module is None and config.actor_factory is not None:
        module = load_factory(config.actor_factory, "actor_factory")(observation_space, action_space)
    if module is None:
        module = _builtin(config, observation_space, action_family(action_space)[1], 0.01)
    if module is not None:
        return ModuleActor(module, observation_space, action_space)
    return make_actor(observation_space, action_space, config.hidden_sizes, config.activation)


def build_critic(
    config: Any, observation_space: gym.Space, action_space: gym.Space,
    module: nn.Module | None = None,
) -> Critic | ModuleCritic:
    """The critic of ``config`` (module docstring); errors as :func:`build_actor`."""
    if module is None and config.critic_factory is not None:
        module = load_factory(config.critic_factory, "critic_factory")(observation_space, action_space)
    if module is None:
        module = _builtin(config, observation_space, 1, 1.0)
    if module is not None:
        return ModuleCritic(module, observation_space)
    return make_critic(observation_space, config.hidden_sizes, config.activation)
