"""Closed-form math of the output distributions natgrad's Fisher knows (``FAMILIES``).

=======================  ==============================================  ========================
``family``               distribution parameters                         Fisher of the output
=======================  ==============================================  ========================
``"categorical"``        logits ``(B, K)``                               ``diag(p) − ppᵀ``
``"diag_gaussian"``      ``(mean (B, d), log_std)``, log σ broadcastable  ``1/σ²`` mean, 2 log σ
``"multi_categorical"``  list of logits ``(B, K_i)``                     block diagonal
``"bernoulli"``          logits ``(B, d)``                               ``p(1 − p)``
=======================  ==============================================  ========================

Everything a trust-region step needs from a distribution (:func:`log_prob`,
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

These are the functions a natural-gradient method needs besides the Fisher itself: the
log-likelihood of a supervised model or the importance ratio of a policy (:func:`log_prob`),
the exact KL that a line search bounds (:func:`kl_divergence`), the entropy, and sampling.

**Invalid actions** (games, scheduling): :func:`mask_logits` sets the logits of invalid
actions to ``−inf``. Every function here then describes the categorical restricted to the
valid actions, ``p_a = exp(l_a) / Σ_{valid} exp(l_b)`` and ``p_a = 0`` otherwise: an invalid
action is never sampled, its ``log_prob`` is ``−inf``, entropy and KL sum over valid actions
only, and the output Fisher ``diag(p) − ppᵀ`` of :func:`natgrad.fisher_operator` is zero on
invalid actions, i.e. the Fisher of the restricted distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from natgrad.guards import broadcast_shape

__all__ = [
    "FAMILIES",
    "DistParams",
    "draw_noise",
    "entropy",
    "kl_divergence",
    "log_prob",
    "mask_logits",
    "mode",
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


def mask_logits(
    logits: Tensor | Sequence[Tensor], mask: Tensor, *, check: bool = True
) -> Tensor | list[Tensor]:
    """``where(mask, logits, −inf)``: the logits of the distribution over valid actions only.

    Gradients and tangents flow into the valid logits only (``torch.where``), so a Fisher
    or a KL built on the result is that of the restricted distribution (module docstring).

    Args:
        logits: ``(*B, K)`` categorical logits, or a list of ``(*B, K_i)`` multi-categorical
            heads.
        mask: Boolean ``(*B, K)``, or ``(*B, ΣK_i)`` for a list (the heads' masks
            concatenated, sb3-contrib's convention); True marks a valid action.
        check: Verify that every state (and head) has a valid action: one host sync.

    Returns:
        The masked logits, shaped like ``logits`` (a list for a list).

    Raises:
        ValueError: ``mask`` is not boolean or has the wrong shape; with ``check``, a state
            or head without a valid action (its distribution would be undefined).
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean tensor, got {got}")
    heads = [logits] if isinstance(logits, Tensor) else list(logits)
    sizes = [h.shape[-1] for h in heads]
    want = (*heads[0].shape[:-1], sum(sizes))
    if tuple(mask.shape) != tuple(want):
        raise ValueError(f"mask must have shape {want} to match the logits, got {tuple(mask.shape)}")
    parts = mask.split(sizes, dim=-1)
    if check and not all(bool(m.any(-1).all()) for m in parts):
        raise ValueError(
            "mask leaves a state without a valid action (a row of the mask, or of one head's "
            "part of it, is all False)"
        )
    out = [torch.where(m, h, -torch.inf) for h, m in zip(heads, parts)]
    return out[0] if isinstance(logits, Tensor) else out


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
        return per_dim.expand(broadcast_shape(mu0.shape, mu1.shape)).sum(-1)
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
