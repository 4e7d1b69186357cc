"""Generalized advantage estimation, GAE(γ, λ) (Schulman et al. 2016).

With ``s'_t`` the *true* next observation of step ``t`` (the final observation
when the episode ended at ``t``), ``term_t`` the termination flag and
``trunc_t`` the truncation (time-limit) flag:

    δ_t = r_t + γ (1 − term_t) V(s'_t) − V(s_t)
    A_t = δ_t + γ λ (1 − term_t)(1 − trunc_t) A_{t+1}          (A_T = 0)
    R_t = A_t + V(s_t)                                           (value target)

A terminated episode bootstraps nothing; a truncated one bootstraps from the
value of its final observation; neither lets the recursion cross into the next
episode. The rollout boundary is handled like a truncation: ``A_T = 0``, and the
last step bootstraps from ``V(s'_{T−1})`` through ``δ_{T−1}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.distributed import LOCAL, Reducer

__all__ = ["compute_gae", "normalize_advantages"]


"""The identity reduction of a single process."""


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminations: Tensor,
    truncations: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Advantages and value targets by GAE(γ, λ), vectorised over envs.

    Args:
        rewards: ``(T, N)`` rewards ``r_t`` (time-major, ``N`` envs).
        values: ``(T, N)`` ``V(s_t)``.
        next_values: ``(T, N)`` ``V(s'_t)`` of the true next observation.
        terminations: ``(T, N)`` bool (or 0/1) termination flags.
        truncations: ``(T, N)`` bool (or 0/1) truncation flags.
        gamma: Discount γ ∈ (0, 1].
        lam: GAE λ ∈ [0, 1].

    Returns:
        ``(advantages, returns)``, both ``(T, N)`` in the dtype of ``values``;
        ``returns = advantages + values``.

    Raises:
        ValueError: On mismatched shapes or γ, λ out of range.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if values.ndim != 2:
        raise ValueError(f"values must be (T, N), got shape {tuple(values.shape)}")
    for name, x in (
        ("rewards", rewards),
        ("next_values", next_values),
        ("terminations", terminations),
        ("truncations", truncations),
    ):
        if x.shape != values.shape:
            raise ValueError(
                f"{name} must have the shape of values {tuple(values.shape)}, got {tuple(x.shape)}"
            )
    dtype = values.dtype
    not_term = 1.0 - terminations.to(dtype)
    not_done = not_term * (1.0 - truncations.to(dtype))
    # Everything but the recursion is one vectorised pass over (T, N).
    deltas = rewards.to(dtype) + gamma * not_term * next_values - values
    coefs = (gamma * lam) * not_done
    advantages = torch.empty_like(deltas)
    last = torch.zeros_like(deltas[0])
    for t in range(deltas.shape[0] - 1, -1, -1):
        # A_t = δ_t + c_t A_{t+1}, written straight into the output row (one kernel).
        last = torch.addcmul(deltas[t], coefs[t], last, out=advantages[t])
    return advantages, advantages + values


def normalize_advantages(
    advantages: Tensor, eps: float = 1e-8, *, reducer: Reducer = LOCAL
) -> Tensor:
    """``(A − μ) / (σ + eps)``, with ``μ``, ``σ`` the mean and population std of the batch.

    When the batch is split over ranks (rank ``r`` holds ``n_r`` of the ``N`` elements, with
    local moments ``μ_r``, ``σ_r``), ``reducer.mean(x, w_r) = Σ_r w_r x_r`` gives the
    moments of the whole batch exactly (Chan et al.)::

        μ = Σ_r w_r μ_r,    σ² = Σ_r w_r (σ_r² + (μ_r − μ)²),    w_r = n_r / N

    In one process (``reducer`` the identity) this is ``(A − mean A) / (std A + eps)`` bit for
    bit: ``sqrt(σ_r²)`` of a float64 square gives ``σ_r`` back.

    Args:
        advantages: This rank's advantages, any shape, e.g. ``(T, N)``.
        eps: Guards a constant batch (then the result is 0).
        reducer: The mean over ranks (``natgrad.distributed.Reducer``); :data:`LOCAL` for one
            process.

    Returns:
        Same shape and dtype.
    """
    mean, std = advantages.mean(), advantages.std(correction=0)
    m, s = mean.double(), std.double()  # the moments travel in float64
    weight = reducer.weight(advantages.numel())
    global_mean = reducer.mean(m, weight)
    global_var = reducer.mean(s * s + (m - global_mean) ** 2, weight)
    mean, std = global_mean.to(advantages.dtype), global_var.sqrt().to(advantages.dtype)
    return (advantages - mean) / (std + eps)
