"""The Fisher of a conditional distribution, averaged over a batch of states.

``F = (1/B) Σ_s J_sᵀ F_out(s) J_s`` with the closed-form Fisher ``F_out`` of the
output distribution in its parametrisation ``z``. At ``θ = θ_old`` it is exactly
the Hessian of the mean forward KL ``E_s[KL(π_old(·|s) ‖ π_θ(·|s))]``, the ``H``
of the TRPO constraint (seed notes: "H 是KL散度关于θ的海森矩阵 ... 就是费雪信息矩阵").

Why ``JᵀF_outJ`` is the KL Hessian: with ``z = f_θ(s)`` the distribution
parameters, ``KL(π_old ‖ π_z)`` has zero gradient in ``z`` at ``z_old`` (it is
minimal there), so the chain rule's second term ``Σ ∂KL/∂z · ∇²z`` vanishes and
``∇²_θ KL = Jᵀ ∇²_z KL J = Jᵀ F_out J`` (the Hessian in ``z`` of the KL at its
minimum is the Fisher in ``z``). Built on :mod:`natgrad.gauss_newton`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from natgrad.curvature_operator import CurvatureOperator
from natgrad.families import FAMILIES  # the families whose closed-form Fisher is known
from natgrad.gauss_newton import categorical_fisher, gauss_newton_curvature
from natgrad.guards import broadcasts_to

__all__ = ["FAMILIES", "fisher_operator"]



def fisher_operator(
    dist_fn: Callable[..., Any],
    params: Mapping[str, Tensor],
    *args: Any,
    family: str,
    linearization: str = "transpose",
    data: Iterable[Any] | None = None,
) -> CurvatureOperator:
    """Fisher of a conditional distribution, averaged over a batch of states.

    ``F v = (1/B) Σ_s J_sᵀ F_out(s) J_s v`` where ``z_s = dist_fn(θ, *args)[s]`` are
    the distribution parameters for state ``s``, ``J_s = ∂z_s/∂θ`` and ``F_out`` the
    closed-form Fisher of the family in the parametrisation ``z``:

    * ``"categorical"``: ``z`` = logits ``(B, K)``; ``F_out = diag(p) − ppᵀ``,
      ``p = softmax(z)``.
    * ``"diag_gaussian"``: ``z = (mean, log_std)``, ``mean`` of shape ``(B, *event)``
      and ``log_std`` broadcastable to it (state-dependent ``(B, *event)`` or a shared
      parameter such as ``(d,)``); ``F_out = diag(1/σ²)`` on the mean and ``2`` on each
      ``log σ``. A shared ``log_std`` is counted once per state (its tangent is
      scaled by the broadcast multiplicity), so the batch mean stays exact.
    * ``"multi_categorical"``: ``z`` = a list/tuple of logits ``(B, K_i)``, one per
      independent sub-action; ``F_out`` is block diagonal in the sub-actions.
    * ``"bernoulli"``: ``z`` = logits ``(B, *event)`` of independent Bernoullis;
      ``F_out = diag(p(1 − p))``, ``p = sigmoid(z)``.

    At ``θ = θ_old`` this equals the Hessian of the mean forward KL
    ``E_s[KL(π_old(·|s) ‖ π_θ(·|s))]`` (see the module docstring), at the cost of
    about one gradient per matvec and no double backprop. The outputs, ``p`` (or
    ``1/σ²``) and the linearisation are computed once here, so CG iterations only
    run the ``J`` / ``Jᵀ`` kernels.

    Args:
        dist_fn: ``dist_fn(params_dict, *args) -> z`` as described per family.
        params: Mapping name -> tensor, the point ``θ`` (normally ``θ_old``).
        *args: One batch: further (fixed) arguments of ``dist_fn`` (e.g. the
            observations).
        family: One of :data:`FAMILIES`.
        linearization: How ``J`` is applied: ``"transpose"`` (default, fastest
            generic), ``"linearize"``, ``"jvp"`` or ``"custom"`` (``dist_fn.linearize``,
            hand-written products; see :mod:`natgrad.gauss_newton`).
        data: Instead of ``*args``, a re-iterable of batches of states: the Fisher
            averaged over all states, one pass over the data per product
            (:mod:`natgrad.batches`).

    Returns:
        A symmetric positive semi-definite ``(n, n)`` :class:`CurvatureOperator`;
        ``op.outputs`` holds the detached distribution parameters ``z`` (one batch
        only).

    Raises:
        ValueError: Unknown ``family`` or ``linearization``; ``dist_fn``'s outputs
            do not have the structure/shapes the family requires, or do not depend
            on ``params``; a train-mode BatchNorm/Dropout; both ``*args`` and ``data``.
        TypeError: ``dist_fn`` returns non-tensors (e.g. numpy) or converts to numpy;
            states of another floating dtype than ``params``; a one-shot ``data``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return gauss_newton_curvature(
        dist_fn, params, args, data, linearization, _FAMILY_FISHERS[family], "dist_fn", "states"
    )


def _like(z: list | tuple, items: list[Tensor]) -> list | tuple:
    """``items`` in the container type of ``z`` (list, tuple or NamedTuple), as vjp needs."""
    if isinstance(z, list):
        return items
    return type(z)(*items) if hasattr(z, "_fields") else type(z)(items)


def _single_tensor(z: Any, what: str) -> Tensor:
    if not isinstance(z, Tensor):
        raise ValueError(f"{what} must be a single tensor, got {type(z).__name__}")
    return z


def _batch_size(z: Tensor, what: str) -> int:
    if z.ndim < 1 or z.shape[0] == 0:
        raise ValueError(f"{what} must have a leading batch dimension B >= 1, got {tuple(z.shape)}")
    return z.shape[0]


def _fisher_categorical(z: Any) -> Callable[[Tensor], Tensor]:
    z = _single_tensor(z, "dist_fn output for family='categorical'")
    if z.ndim != 2:
        raise ValueError(
            f"dist_fn must return logits of shape (B, K) for family='categorical', got {tuple(z.shape)}"
        )
    return categorical_fisher(z, _batch_size(z, "categorical logits"))


def _fisher_multi_categorical(z: Any) -> Callable[[Any], Any]:
    if not isinstance(z, (list, tuple)) or len(z) == 0:
        raise ValueError(
            "dist_fn must return a non-empty list/tuple of logits (B, K_i) for "
            f"family='multi_categorical', got {type(z).__name__}"
        )
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in z]
    if (
        not all(isinstance(t, Tensor) and t.ndim == 2 for t in z)
        or len({t.shape[0] for t in z}) != 1
    ):
        raise ValueError(
            "dist_fn must return logits (B, K_i) with one common B for "
            f"family='multi_categorical', got {shapes}"
        )
    B = _batch_size(z[0], "multi_categorical logits")
    blocks = [categorical_fisher(t, B) for t in z]

    def apply(u: Any) -> Any:
        return _like(z, [f(t) for f, t in zip(blocks, u)])

    return apply


def _fisher_bernoulli(z: Any) -> Callable[[Tensor], Tensor]:
    z = _single_tensor(z, "dist_fn output for family='bernoulli'")
    B = _batch_size(z, "bernoulli logits")
    p = torch.sigmoid(z)
    w = p * (1 - p) / B

    def apply(u: Tensor) -> Tensor:
        return u * w

    return apply


def _fisher_diag_gaussian(z: Any) -> Callable[[Any], Any]:
    if not isinstance(z, (list, tuple)) or len(z) != 2 or not all(isinstance(t, Tensor) for t in z):
        raise ValueError(
            "dist_fn must return (mean, log_std) for family='diag_gaussian', "
            f"got {type(z).__name__}"
        )
    mean, log_std = z
    B = _batch_size(mean, "diag_gaussian mean")
    if not broadcasts_to(log_std.shape, mean.shape):
        raise ValueError(
            f"log_std {tuple(log_std.shape)} must be broadcastable to mean {tuple(mean.shape)} "
            "for family='diag_gaussian'"
        )
    # Per state, F_out = 1/σ² on the mean, 2 on log σ; the 1/B of the batch mean
    # is folded into both. A shared log σ appears in `mult` states (and event
    # positions), so its Fisher block collects mult · 2 / B.
    precision = torch.exp(-2 * log_std) / B
    mult = mean.numel() // max(log_std.numel(), 1)
    log_std_weight = 2.0 * mult / B

    def apply(u: Any) -> Any:
        u_mean, u_log_std = u
        return _like(z, [u_mean * precision, u_log_std * log_std_weight])

    return apply


_FAMILY_FISHERS = {
    "categorical": _fisher_categorical,
    "diag_gaussian": _fisher_diag_gaussian,
    "multi_categorical": _fisher_multi_categorical,
    "bernoulli": _fisher_bernoulli,
}
