"""The trust-region step of natural-gradient methods (TRPO) and its line search.

The seed notes solve ``max g·Δθ  s.t.  ½ Δθᵀ H Δθ ≤ δ`` with the Lagrangian: the
step lies along the natural gradient ``s = H⁻¹g`` and is scaled to the boundary,
``Δθ = sqrt(2δ / gᵀH⁻¹g) · H⁻¹g``. :func:`natural_step` computes ``s`` by CG on
the damped operator ``H + λI`` and scales with ``sᵀ(H + λI)s`` (the same
operator CG solved with, as the peer implementations do), so that
``½ Δθᵀ(H + λI)Δθ = δ`` exactly. Because the model is only quadratic,
:func:`line_search` then backtracks ``θ_old + shrinkᵏ Δθ`` until the true
objective improves and the true constraint (mean KL) holds.

Example:
    >>> import torch
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    >>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    >>> st = natural_step(g, H, delta=0.01)
    >>> st.status, round(float(0.5 * st.step @ H @ st.step), 12)
    (<StepStatus.OK: 'ok'>, 0.01)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from natgrad.cg import CG, CGResult, CGStatus
from natgrad.status import ResultStatus, Status

__all__ = [
    "LineSearchResult",
    "LineSearchStatus",
    "NaturalStep",
    "StepStatus",
    "line_search",
    "natural_step",
]


def _renamed(new: str, new_value: Any, old: str, old_value: Any, where: str) -> Any:
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


def _check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float | Tensor):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    delta = float(delta)
    if not (delta > 0.0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number > 0, got {delta}")
    return delta


class StepStatus(Status):
    """Outcome of :func:`natural_step`, mildest first."""

    OK = "ok", "a step on the trust-region boundary ½Δθᵀ(H + λI)Δθ = δ", True
    ZERO_GRADIENT = (
        "zero_gradient",
        "g = 0: the zero step (nothing to improve to first order)",
        True,
    )
    NON_POSITIVE_CURVATURE = (
        "non_positive_curvature",
        "zero step: CG met pᵀ(H + λI)p ≤ 0 or sᵀ(H + λI)s ≤ 0, so the quadratic model has "
        "no maximiser; add damping or check that H is positive semi-definite (a Fisher/GGN)",
        False,
    )
    INDEFINITE_PRECONDITIONER = (
        "indefinite_preconditioner",
        "zero step: the CG preconditioner is not positive definite",
        False,
    )
    NON_FINITE = (
        "non_finite",
        "zero step: NaN/inf in g, in the curvature products or in the CG iterates; check "
        "the loss, the operator and the dtype",
        False,
    )


@dataclass(frozen=True)
class NaturalStep(ResultStatus):
    """Result of :func:`natural_step`; all tensors 0-d except ``step``, no host sync.

    ``status``, ``success``, ``message`` and ``raise_if_failed()`` come from
    :class:`~natgrad.status.ResultStatus` (reading them syncs).

    Attributes:
        step: ``Δθ = sqrt(2δ / sᵀ(H + λI)s) · s``, shape ``(n,)``; exactly zero unless ok.
        expected_improvement: ``gᵀΔθ`` (the linear model's gain; 0 for a zero step).
        shs: ``sᵀ(H + λI)s`` of the CG solution ``s``.
        scale: ``sqrt(2δ / shs)`` (0 for a zero step).
        cg: The :class:`~natgrad.cg.CGResult` of ``(H + λI) s = g``.
        ok: 0-d bool tensor, True iff the status is ``OK``.
        status_code: The :class:`StepStatus` code; read :attr:`status`.
    """

    status_type = StepStatus

    step: Tensor
    expected_improvement: Tensor
    shs: Tensor
    scale: Tensor
    cg: CGResult
    ok: Tensor
    status_code: Tensor

    @property
    def message(self) -> str:
        """What happened and what to try; a failure caused by CG adds CG's own message."""
        status = self.status
        if status.success or self.cg.success or self.cg.status is CGStatus.MAX_ITERATIONS:
            return status.message
        return f"{status.message} ({self.cg.message})"


_CG_KEYWORDS = ("rtol", "atol", "maxiter", "M", "callback", "check_finite")


def _solver_from(solver: CG | None, cg_options: dict[str, Any]) -> CG:
    """``solver``, or a :class:`CG` from the deprecated ``**cg_options`` bag (with a warning)."""
    if not cg_options:
        return CG() if solver is None else solver
    unknown = sorted(set(cg_options) - set(_CG_KEYWORDS))
    if unknown:
        raise TypeError(f"natural_step() got unexpected keyword arguments {unknown}")
    if solver is not None:
        raise TypeError(f"natural_step() got both solver= and CG keywords {sorted(cg_options)}")
    warnings.warn(
        f"natural_step(**cg_options) is deprecated: pass solver=natgrad.CG("
        f"{', '.join(f'{k}=...' for k in cg_options)})",
        DeprecationWarning,
        stacklevel=3,
    )
    return CG(**cg_options)


def natural_step(
    g: Tensor,
    A: Any,
    delta: float | None = None,
    *,
    damping: float = 0.0,
    solver: CG | None = None,
    x0: Tensor | None = None,
    max_kl: float | None = None,
    **cg_options: Any,
) -> NaturalStep:
    """The natural-gradient step to the trust-region boundary ``½Δθᵀ(H + λI)Δθ = δ``.

    ``s ≈ (H + λI)⁻¹ g`` by ``solver`` (a :class:`~natgrad.cg.CG`), then
    ``Δθ = sqrt(2δ / sᵀ(H + λI)s) · s`` with ``sᵀ(H + λI)s = sᵀ(g − r)`` from CG's
    residual ``r`` (no further operator application). With an exact ``s`` this is the
    seed's ``sqrt(2δ / gᵀH⁻¹g) H⁻¹g`` for the damped ``H``.

    The step is exactly zero, with a status, when ``g = 0`` (``ZERO_GRADIENT``), when CG
    stops on ``pᵀ(H + λI)p ≤ 0`` or ``sᵀ(H + λI)s ≤ 0`` (``NON_POSITIVE_CURVATURE``), on a
    non-positive-definite preconditioner, or on NaN/inf (``NON_FINITE``). CG stopping at
    ``maxiter`` (truncated CG, e.g. the usual 10 iterations) is fine: the step is ``OK``.
    It never holds a NaN. The zeroing uses ``torch.where``, so with CG in fixed-iteration
    mode (``solver=CG(rtol=0, atol=0, maxiter=k, check_finite=False)``) the call never
    synchronises with the host.

    Args:
        g: Gradient of the objective to maximise, real floating ``(n,)``.
        A: The curvature ``H`` (``LinearOperator``, dense tensor, scipy operator,
            callable), as accepted by :func:`~natgrad.cg.cg_solve`.
        delta: The trust-region radius ``δ > 0`` (the mean-KL bound); the same name as in
            :func:`line_search`.
        damping: ``λ ≥ 0``; CG solves with ``H + λI`` and the step is scaled with it.
        solver: The CG settings (default ``CG()``: ``rtol=1e-5``, ``maxiter=10·n``).
        x0: CG's initial guess (e.g. the previous step's ``s``), shape of ``g``.
        max_kl: Deprecated name of ``delta`` (DeprecationWarning).
        **cg_options: Deprecated: ``rtol``, ``atol``, ``maxiter``, ``M``, ``callback``,
            ``check_finite`` build ``solver=CG(**cg_options)`` (DeprecationWarning).

    Returns:
        A :class:`NaturalStep`.

    Raises:
        ValueError: ``delta`` not a finite number ``> 0``; ``g`` not a real 1-D tensor or
            (with ``solver.check_finite``) holding NaN/inf; what :meth:`CG.solve` raises
            for ``A``, ``x0`` and ``damping``, naming ``g`` as the right-hand side.
        TypeError: ``delta`` missing or given twice; unknown keywords.
    """
    delta = _check_delta(_renamed("delta", delta, "max_kl", max_kl, "natural_step"))
    solver = _solver_from(solver, cg_options)
    if not isinstance(g, Tensor) or g.ndim != 1 or not g.dtype.is_floating_point:
        shape = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"g must be a 1-D real floating tensor (n,), got {shape}")
    cg = solver.solve(A, g, x0=x0, damping=damping, b_name="g")
    s = cg.x
    # CG keeps r = g − (H + λI)s up to date, so sᵀ(H + λI)s = sᵀ(g − r) costs no operator
    # application (one Fisher product fewer per TRPO step).
    shs = torch.dot(s, g - cg.residual)

    zero_g = ~(g != 0).any()
    nonfinite = ~(torch.isfinite(g).all() & torch.isfinite(shs)) | cg.status_mask(
        CGStatus.NON_FINITE
    )
    bad_m = cg.status_mask(CGStatus.INDEFINITE_PRECONDITIONER)
    npc = cg.status_mask(CGStatus.NON_POSITIVE_CURVATURE) | (shs <= 0)
    code = torch.full((), StepStatus.code("ok"), dtype=torch.int8, device=g.device)
    for status, mask in (
        (StepStatus.NON_POSITIVE_CURVATURE, npc),
        (StepStatus.INDEFINITE_PRECONDITIONER, bad_m),
        (StepStatus.NON_FINITE, nonfinite),
        (StepStatus.ZERO_GRADIENT, zero_g),
    ):
        code = torch.where(mask, StepStatus.code(status), code)
    ok = code == StepStatus.code("ok")

    # Divide only where shs > 0 is known; select (not multiply) so 0·NaN cannot leak.
    scale = torch.where(ok, torch.sqrt(2.0 * delta / torch.where(ok, shs, 1.0)), 0.0)
    step = torch.where(ok, scale * s, 0.0)
    expected = torch.where(ok, torch.dot(g, step), 0.0)
    return NaturalStep(
        step=step,
        expected_improvement=expected,
        shs=shs,
        scale=scale,
        cg=cg,
        ok=ok,
        status_code=code,
    )


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
    ``CONSTRAINT_VIOLATED`` or ``NON_FINITE``). The seed notes halve the step (``shrink=0.5``); 0.8 is
    the common TRPO default. Functions are evaluated under ``torch.no_grad()``.

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
    delta = _check_delta(_renamed("delta", delta, "max_constraint", max_constraint, "line_search"))
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
