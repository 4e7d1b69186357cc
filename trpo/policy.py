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

Everything a TRPO update needs from a distribution (:func:`log_prob`,
:func:`entropy`, the closed-form forward :func:`kl_divergence`, :func:`sample`,
:func:`mode`) is a pure function of ``(family, dist_params)``, so it composes
with :func:`torch.func.functional_call` and never builds
``torch.distributions`` objects (their argument validation costs more than the
math on small batches). Leading batch dimensions are arbitrary: ``(B,)`` below
stands for any ``(*batch,)``, e.g. ``(T, N)`` for a rollout.

Sampling is split in two so that a rollout can draw all of its randomness in
one call per rollout and pay only a couple of tensor ops per step:
:func:`draw_noise` (uses the explicit ``torch.Generator``) and
:func:`sample_from_noise` (deterministic). :func:`sample` composes them.
Categorical sampling is the Gumbel-max trick ``argmax(logits + G)``, ``G =
−log(−log U)``; Bernoulli is ``logits > L`` with logistic noise ``L = log U −
log(1 − U)``; Gaussian is ``mean + σ·ε``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from natgrad import mlp

__all__ = [
    "FAMILIES",
    "Actor",
    "Critic",
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

FAMILIES = ("categorical", "diag_gaussian", "multi_categorical", "bernoulli")

#: Distribution parameters: logits, ``(mean, log_std)``, or a list of logits.
DistParams = Tensor | tuple[Tensor, Tensor] | list[Tensor]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


# ----------------------------------------------------------------------------
# Pure functions over distribution parameters
# ----------------------------------------------------------------------------


def _categorical_log_prob(logits: Tensor, actions: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def _categorical_entropy(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    # Clamp −inf log-probs (masked logits) so that 0·(−inf) is 0, not NaN.
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(-1)


def _categorical_kl(old_logits: Tensor, new_logits: Tensor) -> Tensor:
    old_logp = torch.log_softmax(old_logits, dim=-1)
    new_logp = torch.log_softmax(new_logits, dim=-1)
    # Σ_a p_old(a) (log p_old(a) − log p_new(a)); clamp as in the entropy.
    tiny = torch.finfo(old_logp.dtype).min
    return (old_logp.exp() * (old_logp.clamp(min=tiny) - new_logp.clamp(min=tiny))).sum(-1)


def log_prob(family: str, dist_params: DistParams, actions: Tensor) -> Tensor:
    """Log-probability (density for Gaussians) of ``actions``, summed over action dims.

    * categorical: ``log softmax(logits)[a]``; actions ``(B,)`` integer.
    * diag_gaussian: ``Σ_j −(a_j − μ_j)²/(2σ_j²) − log σ_j − ½ log 2π``; actions ``(B, d)``.
    * multi_categorical: ``Σ_i log softmax(logits_i)[a_i]``; actions ``(B, k)`` integer.
    * bernoulli: ``Σ_j a_j l_j − softplus(l_j)``; actions ``(B, d)`` in {0, 1}.

    Args:
        family: One of :data:`FAMILIES`.
        dist_params: The actor's output for that family.
        actions: Actions, shapes as above.

    Returns:
        ``(B,)`` log-probabilities.
    """
    _check_family(family)
    if family == "categorical":
        return _categorical_log_prob(dist_params, actions)
    if family == "diag_gaussian":
        mean, log_std = dist_params
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z * z - log_std - _HALF_LOG_2PI).sum(-1)
    if family == "multi_categorical":
        return sum(
            _categorical_log_prob(logits, actions[..., i]) for i, logits in enumerate(dist_params)
        )
    logits = dist_params
    return -F.binary_cross_entropy_with_logits(
        logits, actions.to(logits.dtype), reduction="none"
    ).sum(-1)


def entropy(family: str, dist_params: DistParams) -> Tensor:
    """Entropy of the distribution, summed over action dims.

    * categorical: ``−Σ_a p_a log p_a``.
    * diag_gaussian: ``Σ_j ½ + ½ log 2π + log σ_j`` (broadcast over the batch).
    * multi_categorical: sum of the categorical entropies.
    * bernoulli: ``Σ_j softplus(l_j) − σ(l_j) l_j``.

    Args:
        family: One of :data:`FAMILIES`.
        dist_params: The actor's output for that family.

    Returns:
        ``(B,)`` entropies.
    """
    _check_family(family)
    if family == "categorical":
        return _categorical_entropy(dist_params)
    if family == "diag_gaussian":
        mean, log_std = dist_params
        per_dim = (0.5 + _HALF_LOG_2PI + log_std).expand_as(mean)
        return per_dim.sum(-1)
    if family == "multi_categorical":
        return sum(_categorical_entropy(logits) for logits in dist_params)
    logits = dist_params
    return (F.softplus(logits) - torch.sigmoid(logits) * logits).sum(-1)


def kl_divergence(family: str, old_params: DistParams, new_params: DistParams) -> Tensor:
    """Forward KL ``KL(π_old ‖ π_new)`` per state, in closed form.

    * categorical: ``Σ_a p_old(a) (log p_old(a) − log p_new(a))`` via log-softmax.
    * diag_gaussian: ``Σ_j log(σ_new/σ_old) + (σ_old² + (μ_old − μ_new)²) / (2σ_new²) − ½``.
    * multi_categorical: sum of the categorical KLs (independent sub-actions).
    * bernoulli: ``Σ_j p (log p − log q) + (1 − p)(log(1 − p) − log(1 − q))`` with
      ``log p = logsigmoid(l_old)``, ``log(1 − p) = logsigmoid(−l_old)``.

    This is the constraint of TRPO (seed notes: the mean of this over the sampled
    states must stay ≤ δ); its Hessian in the new parameters at ``new = old`` is
    the Fisher that :func:`natgrad.curvature.fisher_operator` builds.

    Args:
        family: One of :data:`FAMILIES`.
        old_params: Distribution parameters of ``π_old`` (usually detached).
        new_params: Distribution parameters of ``π_new``.

    Returns:
        ``(B,)`` non-negative KLs (0 where ``new == old``).
    """
    _check_family(family)
    if family == "categorical":
        return _categorical_kl(old_params, new_params)
    if family == "diag_gaussian":
        (mu0, log_std0), (mu1, log_std1) = old_params, new_params
        var_ratio = torch.exp(2.0 * (log_std0 - log_std1))
        mean_term = ((mu0 - mu1) * torch.exp(-log_std1)) ** 2
        per_dim = (log_std1 - log_std0) + 0.5 * (var_ratio + mean_term) - 0.5
        return per_dim.expand(torch.broadcast_shapes(mu0.shape, mu1.shape)).sum(-1)
    if family == "multi_categorical":
        if len(old_params) != len(new_params):
            raise ValueError(
                f"old_params and new_params must have as many heads, got "
                f"{len(old_params)} and {len(new_params)}"
            )
        return sum(_categorical_kl(o, n) for o, n in zip(old_params, new_params))
    l0, l1 = old_params, new_params
    log_p, log_1mp = F.logsigmoid(l0), F.logsigmoid(-l0)
    log_q, log_1mq = F.logsigmoid(l1), F.logsigmoid(-l1)
    return (log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)).sum(-1)


def draw_noise(
    family: str,
    dist_params: DistParams,
    generator: torch.Generator,
    batch_shape: Sequence[int] = (),
) -> Tensor | list[Tensor]:
    """Draw the randomness of :func:`sample_from_noise` for ``batch_shape`` extra leading dims.

    With ``batch_shape = (T,)`` and ``dist_params`` of batch ``(N,)``, this draws the
    noise of a whole ``T``-step rollout in one call; ``noise[t]`` then samples step ``t``.

    * categorical: standard Gumbel ``G = −log(−log U)`` shaped like the logits.
    * diag_gaussian: standard normal ``ε`` shaped like the mean.
    * multi_categorical: a list of Gumbel tensors, one per head.
    * bernoulli: standard logistic ``L = log U − log(1 − U)`` shaped like the logits.

    Args:
        family: One of :data:`FAMILIES`.
        dist_params: Distribution parameters (only their shapes, dtype and device are used).
        generator: The explicit RNG (on the device of ``dist_params``).
        batch_shape: Extra leading dimensions.

    Returns:
        A tensor (a list of tensors for multi_categorical).
    """
    _check_family(family)
    batch_shape = tuple(batch_shape)

    def uniform_open(like: Tensor) -> Tensor:
        u = torch.rand(
            batch_shape + tuple(like.shape),
            generator=generator,
            dtype=like.dtype,
            device=like.device,
        )
        # rand is in [0, 1); keep U strictly inside (0, 1) so the logs stay finite.
        tiny = torch.finfo(like.dtype).tiny
        return u.clamp_(min=tiny, max=1.0 - torch.finfo(like.dtype).eps / 2)

    def gumbel(like: Tensor) -> Tensor:
        return -torch.log(-torch.log(uniform_open(like)))

    if family == "categorical":
        return gumbel(dist_params)
    if family == "diag_gaussian":
        mean = dist_params[0]
        return torch.randn(
            batch_shape + tuple(mean.shape),
            generator=generator,
            dtype=mean.dtype,
            device=mean.device,
        )
    if family == "multi_categorical":
        return [gumbel(logits) for logits in dist_params]
    u = uniform_open(dist_params)
    return torch.log(u) - torch.log1p(-u)


def sample_from_noise(
    family: str, dist_params: DistParams, noise: Tensor | Sequence[Tensor]
) -> Tensor:
    """Deterministically turn noise from :func:`draw_noise` into actions.

    * categorical: ``argmax(logits + G)`` (Gumbel-max), int64 ``(B,)``.
    * diag_gaussian: ``μ + σ ε``, ``(B, d)`` (unclipped).
    * multi_categorical: per-head Gumbel-max stacked, int64 ``(B, k)``.
    * bernoulli: ``1[logits > L]`` as floats, ``(B, d)``.

    Args:
        family: One of :data:`FAMILIES`.
        dist_params: Distribution parameters.
        noise: Noise shaped like the output of :func:`draw_noise` for these params.

    Returns:
        Actions.
    """
    _check_family(family)
    if family == "categorical":
        return (dist_params + noise).argmax(-1)
    if family == "diag_gaussian":
        mean, log_std = dist_params
        return torch.addcmul(mean, torch.exp(log_std), noise)
    if family == "multi_categorical":
        return torch.stack([(lg + g).argmax(-1) for lg, g in zip(dist_params, noise)], dim=-1)
    return (dist_params > noise).to(dist_params.dtype)


def sample(family: str, dist_params: DistParams, generator: torch.Generator) -> Tensor:
    """Sample one action per state with an explicit generator (see :func:`sample_from_noise`).

    Args:
        family: One of :data:`FAMILIES`.
        dist_params: Distribution parameters.
        generator: The RNG.

    Returns:
        Actions: int64 ``(B,)`` / float ``(B, d)`` / int64 ``(B, k)`` / float ``(B, d)``.
    """
    return sample_from_noise(family, dist_params, draw_noise(family, dist_params, generator))


def mode(family: str, dist_params: DistParams) -> Tensor:
    """The deterministic action (for evaluation): argmax, mean, per-head argmax, ``logits > 0``.

    Args:
        family: One of :data:`FAMILIES`.
        dist_params: Distribution parameters.

    Returns:
        Actions shaped and typed as in :func:`sample`.
    """
    _check_family(family)
    if family == "categorical":
        return dist_params.argmax(-1)
    if family == "diag_gaussian":
        return dist_params[0]
    if family == "multi_categorical":
        return torch.stack([lg.argmax(-1) for lg in dist_params], dim=-1)
    return (dist_params > 0).to(dist_params.dtype)


# ----------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------


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
    """tanh MLP whose forward calls ``F.linear`` on the layers' parameters directly.

    Calling the ``nn.Linear`` modules themselves would cost one ``Module.__call__``
    (hook dispatch) per layer; reading ``layer.weight`` at call time keeps
    :func:`torch.func.functional_call` working because it swaps those attributes.
    """

    def __init__(self, obs_shape: tuple[int, ...], sizes: Sequence[int], last_gain: float):
        super().__init__()
        self.obs_shape = obs_shape
        self.layers = _mlp_layers(sizes)
        _orthogonal_init(self.layers, last_gain)

    def _flatten_obs(self, obs: Tensor) -> Tensor:
        if len(self.obs_shape) != 1:
            obs = obs.flatten(-len(self.obs_shape)) if self.obs_shape else obs.unsqueeze(-1)
        return obs

    def _weights(self) -> tuple[tuple[Tensor, Tensor], ...]:
        return tuple((layer.weight, layer.bias) for layer in self.layers)

    def _trunk(self, obs: Tensor) -> Tensor:
        return mlp.forward(self._flatten_obs(obs), self._weights())


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
    ):
        obs_dim = observation_dim(observation_space)
        hidden = _check_hidden_sizes(hidden_sizes)
        nvec: tuple[int, ...] = ()
        if isinstance(action_space, gym.spaces.Discrete):
            family, out = "categorical", int(action_space.n)
        elif isinstance(action_space, gym.spaces.Box):
            if len(action_space.shape) != 1:
                raise ValueError(
                    f"action_space {action_space!r} is not supported: Box actions must be 1-D"
                )
            family, out = "diag_gaussian", int(action_space.shape[0])
        elif isinstance(action_space, gym.spaces.MultiDiscrete):
            if action_space.nvec.ndim != 1:
                raise ValueError(
                    f"action_space {action_space!r} is not supported: MultiDiscrete must be 1-D"
                )
            nvec = tuple(int(n) for n in action_space.nvec)
            family, out = "multi_categorical", sum(nvec)
        elif isinstance(action_space, gym.spaces.MultiBinary):
            if len(action_space.shape) != 1:
                raise ValueError(
                    f"action_space {action_space!r} is not supported: MultiBinary must be 1-D"
                )
            family, out = "bernoulli", int(action_space.shape[0])
        else:
            raise ValueError(
                f"action_space {action_space!r} is not supported: use Discrete, Box, "
                f"MultiDiscrete or MultiBinary"
            )
        super().__init__(tuple(observation_space.shape), (obs_dim, *hidden, out), last_gain=0.01)
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
        weights = self._weights()
        flatten = self._flatten_obs

        def trunk(obs: Tensor) -> Tensor:
            return mlp.forward(flatten(obs), weights)

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
            return mlp.numpy_forward(obs if flat else obs.reshape(obs.shape[0], -1), weights)

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
        )


class Critic(_MLP):
    """MLP value function ``(*B, *obs_shape) -> (*B,)`` (last layer orthogonal with gain 1)."""

    def __init__(self, observation_space: gym.Space, hidden_sizes: Sequence[int] = (64, 64)):
        obs_dim = observation_dim(observation_space)
        hidden = _check_hidden_sizes(hidden_sizes)
        super().__init__(tuple(observation_space.shape), (obs_dim, *hidden, 1), last_gain=1.0)

    def forward(self, obs: Tensor) -> Tensor:
        """State values ``V(s)`` of shape ``(*B,)``."""
        return self._trunk(obs).squeeze(-1)


_VERIFIED: weakref.WeakKeyDictionary[Actor, bool] = weakref.WeakKeyDictionary()
"""Per actor: does :meth:`Actor.written_out_dist_fn` compute its forward? (checked once)"""


def make_actor(
    observation_space: gym.Space, action_space: gym.Space, hidden_sizes: Sequence[int] = (64, 64)
) -> Actor:
    """Build the :class:`Actor` for single-env spaces (``envs.single_observation_space``...).

    Raises:
        ValueError: Naming the space when it is not supported.
    """
    return Actor(observation_space, action_space, hidden_sizes)


def make_critic(observation_space: gym.Space, hidden_sizes: Sequence[int] = (64, 64)) -> Critic:
    """Build the :class:`Critic` for a single-env observation space.

    Raises:
        ValueError: Naming the space when it is not supported.
    """
    return Critic(observation_space, hidden_sizes)
