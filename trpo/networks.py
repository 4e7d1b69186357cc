"""Which networks a run trains, in one place shared by training, resuming and evaluation:
the user's modules, the factories named in the config, or the built-in MLP or CNN.

Precedence, per network: a module passed to ``train(config, actor=..., critic=...)``, else
``config.actor_factory`` / ``config.critic_factory`` (``"package.module:factory"``, called as
``factory(observation_space, action_space)``), else ``config.policy``: ``"mlp"``, ``"cnn"``
(:class:`NatureCNN`), ``"gru"`` (:mod:`trpo.recurrent`; no user modules) or ``"auto"`` (the
CNN for image observations, :func:`is_image`). Modules and the CNN are wrapped by :class:`trpo.modules.ModuleActor` / :class:`~trpo.modules.ModuleCritic`.
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
from trpo.recurrent import GRUActor, packed_space

__all__ = [
    "NatureCNN", "PartsNet", "build_actor", "build_critic", "image_parts", "is_image", "pixel_mask",
]


def is_image(space: gym.Space) -> bool:
    """An image observation space: a ``Box`` of shape ``(H, W, C)`` and dtype uint8."""
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


def _init(layers: Sequence[nn.Module], last_gain: float) -> None:
    """Orthogonal init, gain √2 (the last linear layer ``last_gain``), zero biases."""
    weighted = [m for m in layers if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in weighted:
        nn.init.orthogonal_(m.weight, last_gain if m is weighted[-1] else math.sqrt(2))
        nn.init.zeros_(m.bias)


class _Pixels(nn.Module):
    """``(B, H, W, C)`` values in [0, 255] → ``(B, C, H, W)`` in [0, 1]."""

    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(-1, -3) / 255.0


def _image_encoder(shape: Sequence[int]) -> tuple[list[nn.Module], int]:
    """The convolutions and feature layer of :class:`NatureCNN` for ``(H, W, C)`` images."""
    H, W, C = shape
    big = min(H, W) >= 36
    convs, c = [], C
    for width, k, stride in [(32, 8, 4), (64, 4, 2), (64, 3, 1)] if big else [(16, 3, 1), (32, 3, 1)]:
        convs += [nn.Conv2d(c, width, k, stride), nn.ReLU()]
        c = width
    features = math.prod(nn.Sequential(*convs)(torch.zeros(1, C, H, W)).shape)
    width = 512 if big else 128
    return [_Pixels(), *convs, nn.Flatten(), nn.Linear(features, width), nn.ReLU()], width


def _mlp_head(width: int, hidden: Sequence[int], activation: str, out: int) -> list[nn.Module]:
    """The MLP of ``hidden`` widths with ``activation`` after ``width`` features, then the
    output layer."""
    act, sizes, layers = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation], [width, *hidden], []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return [*layers, nn.Linear(sizes[-1], out)]


class NatureCNN(nn.Sequential):
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
        encoder, width = _image_encoder(shape)
        super().__init__(*encoder, *_mlp_head(width, hidden, activation, out))
        _init(self, last_gain)


def image_parts(space: gym.Space) -> list[tuple[int, int, tuple[int, ...] | None]] | None:
    """``(start, stop, image shape or None)`` of each part of a flattened Dict/Tuple observation
    (:class:`trpo.envs.FlatNested`, gymnasium's flatten order), or None without image parts."""
    nested = getattr(space, "nested", None)
    if not isinstance(nested, (gym.spaces.Dict, gym.spaces.Tuple)):
        return None
    subspaces = nested.spaces.values() if isinstance(nested, gym.spaces.Dict) else nested.spaces
    parts, start = [], 0
    for sub in subspaces:
        size = gym.spaces.flatdim(sub)
        parts.append((start, start + size, tuple(sub.shape) if is_image(sub) else None))
        start += size
    return parts if any(shape for _, _, shape in parts) else None


def pixel_mask(space: gym.Space) -> Tensor | None:
    """The elements of a flattened observation that belong to image parts (left raw by the
    observation normaliser, :class:`trpo.normalize.RunningMeanStd`), or None."""
    parts = image_parts(space)
    if parts is None:
        return None
    mask = torch.zeros(parts[-1][1], dtype=torch.bool)
    for start, stop, shape in parts:
        mask[start:stop] = shape is not None
    return mask


class PartsNet(nn.Module):
    """Flattened Dict/Tuple rows ``(B, D)`` → ``(B, out)``: each image part, cut from its slice
    and reshaped, through its own :class:`NatureCNN` encoder; the other parts as they are; all
    concatenated into the MLP of ``hidden`` widths and the output layer."""

    def __init__(self, parts: list, out: int, hidden: Sequence[int], activation: str,
                 last_gain: float):
        super().__init__()
        self.parts, encoders, width = parts, [], 0
        for start, stop, shape in parts:
            layers, w = _image_encoder(shape) if shape else ([], stop - start)
            encoders.append(nn.Sequential(*layers))
            width += w
        self.encoders = nn.ModuleList(encoders)
        self.head = nn.Sequential(*_mlp_head(width, hidden, activation, out))
        _init([*self.encoders.modules(), *self.head], last_gain)

    def forward(self, x: Tensor) -> Tensor:
        features = [enc(x[..., a:b].unflatten(-1, shape) if shape else x[..., a:b])
                    for (a, b, shape), enc in zip(self.parts, self.encoders)]
        return self.head(torch.cat(features, -1))


def _builtin(config: Any, obs_space: gym.Space, out: int, last_gain: float) -> nn.Module | None:
    """The CNN (or, for image parts of a Dict/Tuple, :class:`PartsNet`) if ``config.policy``
    asks for one here, else None (the MLP)."""
    image, parts = is_image(obs_space), image_parts(obs_space)
    if config.policy == "cnn" and not (image or parts):
        raise ValueError(
            f"policy='cnn' needs image observations (a uint8 Box of shape (H, W, C), or one in a "
            f"Dict/Tuple), got {obs_space}; use --policy mlp (or auto)"
        )
    if config.policy == "mlp" or not (image or parts):
        return None
    if parts:  # the normaliser leaves the pixels raw (pixel_mask)
        return PartsNet(parts, out, config.hidden_sizes, config.activation, last_gain)
    if config.normalize_obs:
        raise ValueError(
            "the CNN scales uint8 images by 1/255; normalize_obs would standardise them "
            "first: turn normalize_obs off (or use --policy mlp)"
        )
    return NatureCNN(obs_space.shape, out, config.hidden_sizes, config.activation, last_gain)


def _refuse_module(module: nn.Module | None, what: str) -> None:
    if module is not None:
        raise ValueError(
            f"policy='gru' trains the built-in GRU; a {what} module of your own is not supported "
            "with it (pass policy='mlp' or 'auto' to train your module)"
        )


def build_actor(
    config: Any, observation_space: gym.Space, action_space: gym.Space,
    module: nn.Module | None = None,
) -> Actor | ModuleActor:
    """The actor of ``config`` for single-env spaces (module docstring).

    Raises:
        ValueError: an unsupported space or policy for it, a factory that cannot be imported,
            or a module that breaks the protocol (:class:`trpo.modules.ModuleProtocolError`).
    """
    if config.policy == "gru":
        _refuse_module(module, "actor")
        return GRUActor(config, observation_space, action_space)
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
    if config.policy == "gru":  # an MLP on [start, h_in, x] (trpo.recurrent)
        _refuse_module(module, "critic")
        hidden = config.hidden_sizes[-1]
        return make_critic(packed_space(observation_space, hidden), config.hidden_sizes,
                           config.activation)
    if module is None and config.critic_factory is not None:
        module = load_factory(config.critic_factory, "critic_factory")(observation_space, action_space)
    if module is None:
        module = _builtin(config, observation_space, 1, 1.0)
    if module is not None:
        return ModuleCritic(module, observation_space)
    return make_critic(observation_space, config.hidden_sizes, config.activation)
