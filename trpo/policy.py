"""Actor and critic MLPs, and pure functions over distribution parameters.

The actor's ``forward`` returns the *distribution parameters* of the policy,
exactly in the form :func:`natgrad.curvature.fisher_operator` expects for its
``family``, so TRPO builds the Fisher of the policy with::

    params = dict(actor.named_parameters())
    F = fisher_operator(actor.functional_dist_params, params, obs, family=actor.family)

===================  =========================  ======================================
action space         ``family``                 ``actor(obs)`` returns
===================  =========================  ======================================
``Discrete(K)``      ``"categorical"``          logits ``(B, K)``
``Box((d,))``        ``"diag_gaussian"``        ``(mean (B, d), log_std (d,))``
``MultiDiscrete``    ``"multi_categorical"``    list of logits ``(B, K_i)``
``MultiBinary(d)``   ``"bernoulli"``            logits ``(B, d)``
===================  =========================  ======================================

The Gaussian's ``log_std`` is a state-independent parameter (initialised to 0)
returned as is, broadcastable against the mean.

The distribution math (:func:`log_prob`, :func:`entropy`, :func:`kl_divergence`, sampling)
lives in :mod:`natgrad.families`, re-exported here.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from natgrad import mlp
from natgrad.families import (
    FAMILIES,
    DistParams,
    draw_noise,
    entropy,
    kl_divergence,
    log_prob,
    mode,
    sample,
    sample_from_noise,
)

__all__ = [
    "FAMILIES",
    "Actor",
    "Critic",
    "action_family",
    "DistParams",
    "draw_noise",
    "entropy",
    "kl_divergence",
    "log_prob",
    "make_actor",
    "make_critic",
    "mode",
    "observation_dim",
    "sample",
    "sample_from_noise",
]


def observation_dim(observation_space: gym.Space) -> int:
    """Input width of the MLPs: the flattened size of a ``Box`` observation space.

    Raises:
        ValueError: If the space is not a ``Box`` (``Dict``, ``Tuple``, ``Text``,
            ``Discrete``, ... observations are not supported), naming the space.
    """
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(
            f"observation_space {observation_space!r} is not supported: the MLP policies take "
            f"Box observations (flatten Dict/Tuple observations with "
            f"gymnasium.wrappers.FlattenObservation, one-hot Discrete ones)"
        )
    return int(np.prod(observation_space.shape, dtype=np.int64))


def action_family(action_space: gym.Space) -> tuple[str, int, tuple[int, ...]]:
    """``(family, head width, nvec)`` of an action space: ``("categorical", K, ())`` for
    ``Discrete(K)``, ``("diag_gaussian", d, ())`` for a 1-D ``Box``, ``("multi_categorical",
    ΣK_i, nvec)`` for a 1-D ``MultiDiscrete``, ``("bernoulli", d, ())`` for ``MultiBinary(d)``.

    Raises:
        ValueError: Naming the space when it is not supported.
    """
    spaces = gym.spaces
    if isinstance(action_space, (spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)) and (
        len(action_space.shape) != 1
    ):
        raise ValueError(
            f"action_space {action_space!r} is not supported: "
            f"{type(action_space).__name__} actions must be 1-D"
        )
    nvec: tuple[int, ...] = ()
    if isinstance(action_space, spaces.Discrete):
        family, out = "categorical", int(action_space.n)
    elif isinstance(action_space, spaces.Box):
        family, out = "diag_gaussian", int(action_space.shape[0])
    elif isinstance(action_space, spaces.MultiDiscrete):
        nvec = tuple(int(n) for n in action_space.nvec)
        family, out = "multi_categorical", sum(nvec)
    elif isinstance(action_space, spaces.MultiBinary):
        family, out = "bernoulli", int(action_space.shape[0])
    else:
        raise ValueError(
            f"action_space {action_space!r} is not supported: use Discrete, Box, "
            f"MultiDiscrete or MultiBinary"
        )
    return family, out, nvec


def _mlp_layers(sizes: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))


def _orthogonal_init(layers: nn.ModuleList, last_gain: float) -> None:
    # Orthogonal init with gain √2 for tanh hidden layers, a separate gain for the
    # output layer, zero biases (as in the TRPO/PPO baselines).
    for i, layer in enumerate(layers):
        gain = last_gain if i == len(layers) - 1 else math.sqrt(2.0)
        nn.init.orthogonal_(layer.weight, gain=gain)
        nn.init.zeros_(layer.bias)


def _check_hidden_sizes(hidden_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(h) for h in hidden_sizes)
    if any(h <= 0 for h in sizes):
        raise ValueError(f"hidden_sizes must be positive integers, got {tuple(hidden_sizes)}")
    return sizes


class _MLP(nn.Module):
    """tanh (or relu) MLP whose forward calls ``F.linear`` on the layers' parameters directly.

    Calling the ``nn.Linear`` modules themselves would cost one ``Module.__call__``
    (hook dispatch) per layer; reading ``layer.weight`` at call time keeps
    :func:`torch.func.functional_call` working because it swaps those attributes.
    """

    def __init__(
        self, obs_shape: tuple[int, ...], sizes: Sequence[int], last_gain: float, activation: str
    ):
        super().__init__()
        if activation not in mlp.ACTIVATIONS:
            raise ValueError(f"activation must be one of {mlp.ACTIVATIONS}, got {activation!r}")
        self.obs_shape, self.activation = obs_shape, activation
        self.layers = _mlp_layers(sizes)
        _orthogonal_init(self.layers, last_gain)

    def _flatten_obs(self, obs: Tensor) -> Tensor:
        if len(self.obs_shape) != 1:
            obs = obs.flatten(-len(self.obs_shape)) if self.obs_shape else obs.unsqueeze(-1)
        return obs

    def _weights(self) -> tuple[tuple[Tensor, Tensor], ...]:
        return tuple((layer.weight, layer.bias) for layer in self.layers)

    def _trunk(self, obs: Tensor) -> Tensor:
        return mlp.forward(self._flatten_obs(obs), self._weights(), self.activation)


class Actor(_MLP):
    """MLP policy ``obs -> distribution parameters``.

    Attributes:
        family: The natgrad Fisher family of the action distribution.
        action_space: The (single-env) gymnasium action space.
        obs_shape: Shape of one observation; inputs are ``(*B, *obs_shape)``.
        action_dim: Output width of the head (K, d, Σ nvec or d).
        nvec: Sub-action sizes (multi_categorical only, else ``()``).
        log_std: ``(d,)`` state-independent log σ (diag_gaussian only).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
    ):
        obs_dim = observation_dim(observation_space)
        hidden = _check_hidden_sizes(hidden_sizes)
        family, out, nvec = action_family(action_space)
        shape = tuple(observation_space.shape)
        super().__init__(shape, (obs_dim, *hidden, out), last_gain=0.01, activation=activation)
        self.family = family
        self.action_space = action_space
        self.action_dim = out
        self.nvec = nvec
        if family == "diag_gaussian":
            self.log_std = nn.Parameter(torch.zeros(out))

    def forward(self, obs: Tensor) -> DistParams:
        """Distribution parameters for a batch of (normalised) observations ``(*B, *obs_shape)``."""
        out = self._trunk(obs)
        if self.family == "diag_gaussian":
            return out, self.log_std
        if self.family == "multi_categorical":
            return list(torch.split(out, self.nvec, dim=-1))
        return out

    def inference_fn(self) -> Callable[[Tensor], DistParams]:
        """A fast ``obs -> dist params`` closure over the *current* parameter tensors.

        Same result as ``self(obs)`` without any ``nn.Module`` dispatch (the rollout
        calls it once per env step, where that dispatch costs more than the math).
        It sees in-place changes of the parameters (optimiser steps, ``copy_``) but
        not replaced parameter objects (``functional_call``, ``load_state_dict(...,
        assign=True)``), so build it anew for each rollout.
        """
        weights, flatten, activation = self._weights(), self._flatten_obs, self.activation

        def trunk(obs: Tensor) -> Tensor:
            return mlp.forward(flatten(obs), weights, activation)

        return self._head(trunk, self.log_std if self.family == "diag_gaussian" else None)

    def numpy_inference_fn(self) -> Callable[[np.ndarray], Any]:
        """:meth:`inference_fn` in numpy, for CPU actors: ``(N, *obs_shape)`` array in,
        dist params as numpy arrays out (``log_std`` as a ``(d,)`` array).

        A numpy op on a tiny array costs about a third of a torch op (no dispatcher),
        which is most of a small MLP's per-step cost. The weights are zero-copy views
        of the parameters (same validity rule as :meth:`inference_fn`); the results
        equal ``self(obs)`` up to float rounding (BLAS summation order).

        Raises:
            ValueError: If the parameters are not on the CPU.
        """
        if any(p.device.type != "cpu" for p in self.parameters()):
            raise ValueError("numpy_inference_fn needs the actor's parameters on the CPU")
        weights = tuple((w.detach().numpy(), b.detach().numpy()) for w, b in self._weights())
        flat = len(self.obs_shape) == 1

        def trunk(obs: np.ndarray) -> np.ndarray:
            x = obs if flat else obs.reshape(obs.shape[0], -1)
            return mlp.numpy_forward(x, weights, self.activation)

        log_std = self.log_std.detach().numpy() if self.family == "diag_gaussian" else None
        if self.family == "multi_categorical":
            splits = np.cumsum(self.nvec)[:-1]
            return lambda obs: np.split(trunk(obs), splits, axis=-1)
        return self._head(trunk, log_std)

    def _head(self, trunk: Callable[[Any], Any], log_std: Any) -> Callable[[Any], Any]:
        """``obs -> dist params`` from the trunk's output, structured as :meth:`forward`'s."""
        if self.family == "diag_gaussian":
            return lambda obs: (trunk(obs), log_std)
        if self.family == "multi_categorical":
            nvec = self.nvec
            return lambda obs: list(torch.split(trunk(obs), nvec, dim=-1))
        return trunk

    def functional_dist_params(self, params: Mapping[str, Tensor], obs: Tensor) -> DistParams:
        """``forward`` with the parameters taken from ``params`` (``functional_call``).

        This is the ``dist_fn`` for ``natgrad.curvature.fisher_operator(dist_fn, params, obs,
        family=actor.family)``; ``params`` may be a subset of ``named_parameters()``.
        """
        return functional_call(self, params, (obs,))

    def written_out_dist_fn(
        self, params: Mapping[str, Tensor], obs: Tensor
    ) -> mlp.MLPDistFn | None:
        """:meth:`functional_dist_params` with ``J``, ``Jᵀ`` written out (:mod:`natgrad.mlp`),
        for ``fisher_operator(..., linearization="custom")``; ``None`` unless this is the
        plain tanh-MLP actor and ``params`` are exactly its parameters.

        A subclass that overrides ``forward`` is declined at once; one that changes the
        network behind it is caught by a numerical comparison with
        :meth:`functional_dist_params` on a few states of ``obs``, made once per actor
        (reading it is a host sync, which must not recur inside a recorded CUDA graph).
        """
        fn = self._dist_fn
        if type(self).forward is not Actor.forward or set(params) != fn.names:
            return None
        if set(dict(self.named_parameters())) != fn.names or obs.ndim < 1 or obs.shape[0] == 0:
            return None
        if obs[0].numel() != self.layers[0].in_features:
            return None
        verified = _VERIFIED.get(self)
        if verified is None:
            verified = _VERIFIED[self] = fn.agrees_with(self.functional_dist_params, params, obs)
        return fn if verified else None

    @property
    def _dist_fn(self) -> mlp.MLPDistFn:
        n = len(self.layers)
        return mlp.MLPDistFn(
            [f"layers.{i}.weight" for i in range(n)],
            [f"layers.{i}.bias" for i in range(n)],
            family=self.family,
            heads=self.nvec,
            log_std="log_std" if self.family == "diag_gaussian" else None,
            activation=self.activation,
        )


class Critic(_MLP):
    """MLP value function ``(*B, *obs_shape) -> (*B,)`` (last layer orthogonal with gain 1)."""

    def __init__(
        self,
        observation_space: gym.Space,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
    ):
        obs_dim = observation_dim(observation_space)
        hidden = _check_hidden_sizes(hidden_sizes)
        shape = tuple(observation_space.shape)
        super().__init__(shape, (obs_dim, *hidden, 1), last_gain=1.0, activation=activation)

    def forward(self, obs: Tensor) -> Tensor:
        """State values ``V(s)`` of shape ``(*B,)``."""
        return self._trunk(obs).squeeze(-1)


_VERIFIED: weakref.WeakKeyDictionary[Actor, bool] = weakref.WeakKeyDictionary()
"""Per actor: does :meth:`Actor.written_out_dist_fn` compute its forward? (checked once)"""


def make_actor(
    observation_space: gym.Space,
    action_space: gym.Space,
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "tanh",
) -> Actor:
    """Build the :class:`Actor` for single-env spaces (``envs.single_observation_space``...).

    Raises:
        ValueError: Naming the space when it is not supported.
    """
    return Actor(observation_space, action_space, hidden_sizes, activation)


def make_critic(
    observation_space: gym.Space, hidden_sizes: Sequence[int] = (64, 64), activation: str = "tanh"
) -> Critic:
    """Build the :class:`Critic` for a single-env observation space.

    Raises:
        ValueError: Naming the space when it is not supported.
    """
    return Critic(observation_space, hidden_sizes, activation)
