"""Backtracking line search on the exact objective and constraint of a trust-region step.

Because the quadratic model of the constraint (and the linear model of the objective) behind
:func:`natgrad.trust_region.natural_step` is only a model, :func:`line_search` tries
``θ_old + shrinkᵏ Δθ`` for ``k = 0, 1, ...`` and accepts the first candidate whose exact
objective improves and whose exact constraint (the mean KL in TRPO) is within ``δ``; if
none qualifies, θ stays ``θ_old`` bit for bit and the status says why the smallest
candidate failed. A batched variant evaluates all candidates at once and selects on the
device with no host sync.

Example:
    >>> import torch
    >>> g = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> res = line_search(lambda t: g @ t, lambda t: t @ t, torch.zeros(2, dtype=torch.float64),
    ...                   g, delta=0.5)
    >>> res.status, round(float(res.step_fraction), 12)   # first 0.8ᵏ with 2·0.8²ᵏ ≤ 0.5
    (<LineSearchStatus.ACCEPTED: 'accepted'>, 0.4096)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from natgrad.status import ResultStatus, Status

__all__ = ["LineSearchResult", "LineSearchStatus", "check_delta", "line_search", "renamed"]


def renamed(new: str, new_value: Any, old: str, old_value: Any, where: str) -> Any:
    """The value of the keyword ``new``, accepting its deprecated name ``old`` with a warning."""
    if old_value is None:
        if new_value is None:
            raise TypeError(f"{where}() missing required argument '{new}'")
        return new_value
    if new_value is not None:
        raise TypeError(f"{where}() got both '{new}' and its deprecated name '{old}'")
    warnings.warn(
        f"{where}({old}=...) is deprecated, use {where}({new}=...)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def check_delta(delta: Any) -> float:
    """The trust-region radius ``δ`` as a float; ValueError unless a finite number ``> 0``."""
    if isinstance(delta, bool) or not isinstance(delta, int | float | Tensor):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    delta = float(delta)
    if not (delta > 0.0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number > 0, got {delta}")
    return delta


class LineSearchStatus(Status):
    """Outcome of :func:`line_search`, mildest first; a failure names the smallest candidate."""

    ACCEPTED = "accepted", "a candidate improved the objective within the constraint", True
    NO_IMPROVEMENT = (
        "no_improvement",
        "θ unchanged: even the smallest candidate θ_old + shrink^(max_tries−1)·Δθ did not "
        "improve the objective (by accept_ratio·expected_improvement when given); check the "
        "sign of the gradient (the objective is maximised), or raise max_tries or damping",
        False,
    )
    CONSTRAINT_VIOLATED = (
        "constraint_violated",
        "θ unchanged: even the smallest candidate violated constraint ≤ slack·δ; raise "
        "max_tries or lower shrink, and check that constraint_fn matches the curvature the "
        "step was scaled with",
        False,
    )
    NON_FINITE = (
        "non_finite",
        "θ unchanged: the smallest candidate gave a NaN/inf objective or constraint; check "
        "the functions near θ_old and the step for NaN/inf",
        False,
    )


@dataclass(frozen=True)
class LineSearchResult(ResultStatus):
    """Result of :func:`line_search`; 0-d tensors on ``theta_old``'s device.

    ``status`` (a :class:`LineSearchStatus`), ``success``, ``message`` and
    ``raise_if_failed()`` come from :class:`~natgrad.status.ResultStatus` (reading them
    syncs); building the result does not.

    Attributes:
        theta: The accepted point, or a bit-for-bit copy of ``theta_old``.
        accepted: Whether a candidate was accepted (bool).
        step_fraction: ``shrinkᵏ`` of the accepted candidate, 0 when none.
        improvement: ``f(θ) − f(θ_old)`` of the accepted candidate, or of the last
            candidate tried when none was accepted (for diagnostics).
        constraint: The constraint at the same candidate.
        tries: Candidates up to and including the accepted one (``max_tries`` when
            none). The batched variant evaluates all of them regardless.
        status_code: The :class:`LineSearchStatus` code; read :attr:`status`.
    """

    status_type = LineSearchStatus

    theta: Tensor
    accepted: Tensor
    step_fraction: Tensor
    improvement: Tensor
    constraint: Tensor
    tries: Tensor
    status_code: Tensor


def _status_code(accepted: Tensor, improvement: Tensor, constraint: Tensor, bound: float) -> Tensor:
    """The :class:`LineSearchStatus` code from the last candidate tried (no host sync)."""
    code = torch.where(
        constraint > bound,
        LineSearchStatus.code("constraint_violated"),
        LineSearchStatus.code("no_improvement"),
    )
    finite = torch.isfinite(improvement) & torch.isfinite(constraint)
    code = torch.where(finite, code, LineSearchStatus.code("non_finite"))
    return torch.where(accepted, LineSearchStatus.code("accepted"), code).to(torch.int8)


def _check_line_search_args(
    theta_old: Tensor,
    step: Tensor,
    shrink: float,
    max_tries: int,
    accept_ratio: float,
    constraint_slack: float,
) -> None:
    if not isinstance(theta_old, Tensor) or theta_old.ndim != 1:
        raise ValueError("theta_old must be a 1-D tensor (n,)")
    if not theta_old.dtype.is_floating_point:
        raise ValueError(f"theta_old must be floating point, got {theta_old.dtype}")
    if (
        not isinstance(step, Tensor)
        or step.shape != theta_old.shape
        or step.dtype != theta_old.dtype
        or step.device != theta_old.device
    ):
        raise ValueError(
            f"step must match theta_old ({tuple(theta_old.shape)} {theta_old.dtype} on "
            f"{theta_old.device})"
        )
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink must be in (0, 1), got {shrink}")
    if isinstance(max_tries, bool) or int(max_tries) != max_tries or max_tries < 1:
        raise ValueError(f"max_tries must be an int >= 1, got {max_tries!r}")
    if not (math.isfinite(accept_ratio) and accept_ratio >= 0):
        raise ValueError(f"accept_ratio must be a finite number >= 0, got {accept_ratio}")
    if not (math.isfinite(constraint_slack) and constraint_slack > 0):
        raise ValueError(f"constraint_slack must be a finite number > 0, got {constraint_slack}")


def _scalar(value: Any, like: Tensor, name: str) -> Tensor:
    out = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if out.ndim != 0:
        raise ValueError(f"{name} must return a scalar, got shape {tuple(out.shape)}")
    return out


def line_search(
    objective_fn: Callable[[Tensor], Any],
    constraint_fn: Callable[[Tensor], Any],
    theta_old: Tensor,
    step: Tensor,
    *,
    delta: float | None = None,
    expected_improvement: float | Tensor | None = None,
    shrink: float = 0.8,
    max_tries: int = 10,
    accept_ratio: float = 0.0,
    constraint_slack: float = 1.0,
    objective_old: float | Tensor | None = None,
    batched: bool = False,
    max_constraint: float | None = None,
) -> LineSearchResult:
    """Backtracking line search on ``θ_old + shrinkᵏ Δθ``, ``k = 0 .. max_tries − 1``.

    Accepts the first candidate with

    * ``f(θ) − f(θ_old) > 0`` and ``≥ accept_ratio · expected_improvement · shrinkᵏ``
      (the second test only when ``expected_improvement`` is given),
    * ``c(θ) ≤ constraint_slack · δ``,
    * both ``f(θ)`` and ``c(θ)`` finite (a NaN/inf candidate is rejected).

    If none qualifies, ``theta`` is a copy of ``θ_old`` (bit for bit), ``accepted`` is
    False and the status says why the smallest candidate failed (``NO_IMPROVEMENT``,
    ``CONSTRAINT_VIOLATED`` or ``NON_FINITE``). The seed notes halve the step
    (``shrink=0.5``); 0.8 is the common TRPO default. Functions are evaluated under ``torch.no_grad()``.

    Sequential (default): ``objective_fn(θ)`` and ``constraint_fn(θ)`` take a
    ``(n,)`` vector and return a scalar (float or 0-d tensor); evaluation stops at
    the first acceptable candidate (one host sync per candidate).

    Batched (``batched=True``, for GPUs): the functions take a stack ``(m, n)`` of
    points and return ``(m,)`` values (``torch.func.vmap(f)`` turns a per-point
    function into one). All ``max_tries`` candidates are evaluated in one call
    each (the objective also gets ``θ_old`` as the first row when
    ``objective_old`` is not given, so ``m`` is ``max_tries`` or ``max_tries + 1``),
    and the first acceptable one is selected on the device with no host sync.
    The result equals the sequential one.

    Args:
        objective_fn: ``f``, the objective to maximise (e.g. the TRPO surrogate).
        constraint_fn: ``c``, the constraint (e.g. the mean KL to ``π_old``).
        theta_old: The current point ``θ_old``, shape ``(n,)``.
        step: The full step ``Δθ``, same shape, dtype and device.
        delta: The bound ``δ > 0`` on ``c`` (the same name as in :func:`natural_step`).
        expected_improvement: ``gᵀΔθ`` of the full step (linear model), or None.
        shrink: Backtracking factor in ``(0, 1)``.
        max_tries: Number of candidates, ``≥ 1``.
        accept_ratio: ``≥ 0``; required fraction of the expected improvement.
        constraint_slack: ``> 0``; the constraint bound is ``slack · δ``.
        objective_old: ``f(θ_old)`` if already known (saves one evaluation).
        batched: Evaluate all candidates at once, select on device (see above).
        max_constraint: Deprecated name of ``delta`` (DeprecationWarning).

    Returns:
        A :class:`LineSearchResult`.

    Raises:
        ValueError: Invalid ``shrink``, ``max_tries``, ``delta``,
            ``accept_ratio``, ``constraint_slack``, or ``step`` not matching
            ``theta_old``; a function returning a non-scalar (sequential) or not
            ``(m,)`` (batched).
    """
    delta = check_delta(renamed("delta", delta, "max_constraint", max_constraint, "line_search"))
    shrink = float(shrink)
    accept_ratio = float(accept_ratio)
    constraint_slack = float(constraint_slack)
    _check_line_search_args(theta_old, step, shrink, max_tries, accept_ratio, constraint_slack)
    max_tries = int(max_tries)
    bound = constraint_slack * delta
    with torch.no_grad():
        if batched:
            return _batched_line_search(
                objective_fn,
                constraint_fn,
                theta_old,
                step,
                bound,
                expected_improvement,
                shrink,
                max_tries,
                accept_ratio,
                objective_old,
            )
        f_old = (
            _scalar(objective_fn(theta_old), theta_old, "objective_fn")
            if objective_old is None
            else _scalar(objective_old, theta_old, "objective_old")
        )
        expected = (
            None
            if expected_improvement is None
            else _scalar(expected_improvement, theta_old, "expected_improvement")
        )
        improvement = constraint = torch.zeros((), dtype=theta_old.dtype, device=theta_old.device)
        for k in range(max_tries):
            frac = shrink**k
            theta = theta_old + frac * step
            improvement = _scalar(objective_fn(theta), theta_old, "objective_fn") - f_old
            constraint = _scalar(constraint_fn(theta), theta_old, "constraint_fn")
            ok = (
                torch.isfinite(improvement)
                & torch.isfinite(constraint)
                & (improvement > 0)
                & (constraint <= bound)
            )
            if expected is not None:
                ok = ok & (improvement >= accept_ratio * expected * frac)
            if bool(ok):
                return LineSearchResult(
                    theta=theta,
                    accepted=torch.ones((), dtype=torch.bool, device=theta.device),
                    step_fraction=torch.full((), frac, dtype=theta.dtype, device=theta.device),
                    improvement=improvement,
                    constraint=constraint,
                    tries=torch.full((), k + 1, dtype=torch.int64, device=theta.device),
                    status_code=_status_code(ok, improvement, constraint, bound),
                )
        rejected = torch.zeros((), dtype=torch.bool, device=theta_old.device)
        return LineSearchResult(
            theta=theta_old.clone(),
            accepted=rejected,
            step_fraction=torch.zeros((), dtype=theta_old.dtype, device=theta_old.device),
            improvement=improvement,
            constraint=constraint,
            tries=torch.full((), max_tries, dtype=torch.int64, device=theta_old.device),
            status_code=_status_code(rejected, improvement, constraint, bound),
        )


def _batched_line_search(
    objective_fn: Callable[[Tensor], Tensor],
    constraint_fn: Callable[[Tensor], Tensor],
    theta_old: Tensor,
    step: Tensor,
    bound: float,
    expected_improvement: float | Tensor | None,
    shrink: float,
    max_tries: int,
    accept_ratio: float,
    objective_old: float | Tensor | None,
) -> LineSearchResult:
    dev, dtype = theta_old.device, theta_old.dtype
    # Fractions built on the device (a host-to-device copy would sync on CUDA).
    fracs = torch.pow(shrink, torch.arange(max_tries, device=dev, dtype=dtype))
    candidates = theta_old + fracs[:, None] * step  # (max_tries, n)

    def values(fn: Callable[[Tensor], Tensor], points: Tensor, name: str) -> Tensor:
        out = torch.as_tensor(fn(points), device=dev).to(dtype)
        if out.shape != (points.shape[0],):
            raise ValueError(
                f"{name} must map a ({points.shape[0]}, n) stack to ({points.shape[0]},) "
                f"values when batched=True, got {tuple(out.shape)}"
            )
        return out

    if objective_old is None:
        f_all = values(objective_fn, torch.cat([theta_old[None], candidates]), "objective_fn")
        f_old, f = f_all[0], f_all[1:]
    else:
        f_old = _scalar(objective_old, theta_old, "objective_old")
        f = values(objective_fn, candidates, "objective_fn")
    c = values(constraint_fn, candidates, "constraint_fn")
    improvement = f - f_old
    ok = torch.isfinite(improvement) & torch.isfinite(c) & (improvement > 0) & (c <= bound)
    if expected_improvement is not None:
        expected = _scalar(expected_improvement, theta_old, "expected_improvement")
        ok = ok & (improvement >= accept_ratio * expected * fracs)
    any_ok = ok.any()
    # argmax returns the first maximal index: the first acceptable candidate, or the
    # last one (for diagnostics) when none is acceptable.
    first = torch.argmax(ok.to(torch.int8)).reshape(1)
    pick = torch.where(any_ok, first, max_tries - 1)
    theta = torch.where(any_ok, torch.index_select(candidates, 0, pick)[0], theta_old)
    picked_improvement = improvement.index_select(0, pick)[0]
    picked_constraint = c.index_select(0, pick)[0]
    return LineSearchResult(
        theta=theta,
        accepted=any_ok,
        step_fraction=torch.where(any_ok, fracs.index_select(0, pick)[0], 0.0),
        improvement=picked_improvement,
        constraint=picked_constraint,
        tries=torch.where(any_ok, pick[0] + 1, max_tries),
        status_code=_status_code(any_ok, picked_improvement, picked_constraint, bound),
    )
