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
    >>> st = natural_step(g, H, max_kl=0.01)
    >>> st.status, round(float(0.5 * st.step @ H @ st.step), 12)
    (<StepStatus.OK: 'ok'>, 0.01)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from natgrad.cg import CGResult, CGStatus, _as_matvec, cg_solve

__all__ = [
    "LineSearchResult",
    "NaturalStep",
    "StepStatus",
    "line_search",
    "natural_step",
]


class StepStatus(str, enum.Enum):
    """Outcome of :func:`natural_step`."""

    OK = "ok"
    ZERO_GRADIENT = "zero_gradient"
    NON_POSITIVE_CURVATURE = "non_positive_curvature"
    INDEFINITE_PRECONDITIONER = "indefinite_preconditioner"
    NON_FINITE = "non_finite"

    @property
    def message(self) -> str:
        """What the status means and what to try."""
        return _STEP_MESSAGES[self]


_STEP_MESSAGES = {
    StepStatus.OK: "a step on the trust-region boundary ½Δθᵀ(H + λI)Δθ = δ",
    StepStatus.ZERO_GRADIENT: "g = 0: the zero step (nothing to improve to first order)",
    StepStatus.NON_POSITIVE_CURVATURE: (
        "zero step: CG met pᵀ(H + λI)p ≤ 0 or sᵀ(H + λI)s ≤ 0, so the quadratic model has "
        "no maximiser; add damping or check that H is positive semi-definite (a Fisher/GGN)"
    ),
    StepStatus.INDEFINITE_PRECONDITIONER: (
        "zero step: the CG preconditioner is not positive definite"
    ),
    StepStatus.NON_FINITE: (
        "zero step: NaN/inf in g, in the curvature products or in the CG iterates; check "
        "the loss, the operator and the dtype"
    ),
}
_STEP_ORDER = tuple(StepStatus)
_STEP_CODE = {s: i for i, s in enumerate(_STEP_ORDER)}


@dataclass(frozen=True)
class NaturalStep:
    """Result of :func:`natural_step`; all tensors 0-d except ``step``, no host sync.

    Attributes:
        step: ``Δθ = sqrt(2δ / sᵀ(H + λI)s) · s``, shape ``(n,)``; exactly zero unless ok.
        expected_improvement: ``gᵀΔθ`` (the linear model's gain; 0 for a zero step).
        shs: ``sᵀ(H + λI)s`` of the CG solution ``s``.
        scale: ``sqrt(2δ / shs)`` (0 for a zero step).
        cg: The :class:`~natgrad.cg.CGResult` of ``(H + λI) s = g``.
        ok: 0-d bool tensor, True iff the status is ``OK``.
        status_code: Internal; read :attr:`status`.
    """

    step: Tensor
    expected_improvement: Tensor
    shs: Tensor
    scale: Tensor
    cg: CGResult
    ok: Tensor
    status_code: Tensor

    @property
    def status(self) -> StepStatus:
        """The :class:`StepStatus` (reading it synchronises with the device)."""
        return _STEP_ORDER[int(self.status_code)]


def natural_step(
    g: Tensor,
    A: Any,
    max_kl: float,
    *,
    damping: float = 0.0,
    **cg_options: Any,
) -> NaturalStep:
    """The natural-gradient step to the trust-region boundary ``½Δθᵀ(H + λI)Δθ = δ``.

    ``s ≈ (H + λI)⁻¹ g`` by :func:`~natgrad.cg.cg_solve`, then
    ``Δθ = sqrt(2δ / sᵀ(H + λI)s) · s`` with ``sᵀ(H + λI)s = sᵀ(g − r)`` from CG's
    residual ``r`` (no further operator application). With an exact ``s`` this is the
    seed's ``sqrt(2δ / gᵀH⁻¹g) H⁻¹g`` for the damped ``H``.

    The step is exactly zero, with a status, when ``g = 0`` (``ZERO_GRADIENT``),
    when CG stops on ``pᵀ(H + λI)p ≤ 0`` or ``sᵀ(H + λI)s ≤ 0``
    (``NON_POSITIVE_CURVATURE``), on a non-positive-definite preconditioner, or on
    NaN/inf (``NON_FINITE``). CG stopping at ``maxiter`` (truncated CG, e.g. the
    usual 10 iterations) is fine: the step is ``OK``. It never holds a NaN. The
    zeroing uses ``torch.where``, so with CG in fixed-iteration mode
    (``rtol=0, atol=0, maxiter=k, check_finite=False``) the call never
    synchronises with the host.

    Args:
        g: Gradient of the objective to maximise, shape ``(n,)``.
        A: The curvature ``H`` (``LinearOperator``, dense tensor, scipy operator,
            callable), as accepted by :func:`~natgrad.cg.cg_solve`.
        max_kl: The trust-region radius ``δ > 0`` (the mean-KL bound).
        damping: ``λ ≥ 0``; CG solves with ``H + λI`` and the step is scaled with it.
        **cg_options: Passed to :func:`~natgrad.cg.cg_solve` (``rtol``, ``atol``,
            ``maxiter``, ``M``, ``x0``, ``callback``, ``check_finite``).

    Returns:
        A :class:`NaturalStep`.

    Raises:
        ValueError: ``max_kl`` not a finite number ``> 0``; ``g`` not 1-D; and what
            :func:`~natgrad.cg.cg_solve` raises for bad input.
    """
    max_kl = float(max_kl)
    if not (max_kl > 0.0 and math.isfinite(max_kl)):
        raise ValueError(f"max_kl must be a finite number > 0, got {max_kl}")
    if not isinstance(g, Tensor) or g.ndim != 1:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"g must be a 1-D tensor (n,), got {shape}")
    cg = cg_solve(A, g, damping=damping, **cg_options)
    s = cg.x
    if cg.residual is not None:
        # CG keeps r = g − (H + λI)s up to date, so sᵀ(H + λI)s = sᵀ(g − r) costs no
        # operator application (one Fisher product fewer per TRPO step); r differs from the
        # true residual by the recursion's rounding only.
        shs = torch.dot(s, g - cg.residual)
    else:
        matvec = _as_matvec(A, g, "A")
        hs = matvec(s)
        if damping:
            hs = hs + float(damping) * s
        shs = torch.dot(s, hs)

    zero_g = ~(g != 0).any()
    nonfinite = ~(torch.isfinite(g).all() & torch.isfinite(shs)) | cg.status_mask(
        CGStatus.NON_FINITE
    )
    bad_m = cg.status_mask(CGStatus.INDEFINITE_PRECONDITIONER)
    npc = cg.status_mask(CGStatus.NON_POSITIVE_CURVATURE) | (shs <= 0)
    code = torch.full((), _STEP_CODE[StepStatus.OK], dtype=torch.int8, device=g.device)
    code = torch.where(npc, _STEP_CODE[StepStatus.NON_POSITIVE_CURVATURE], code)
    code = torch.where(bad_m, _STEP_CODE[StepStatus.INDEFINITE_PRECONDITIONER], code)
    code = torch.where(nonfinite, _STEP_CODE[StepStatus.NON_FINITE], code)
    code = torch.where(zero_g, _STEP_CODE[StepStatus.ZERO_GRADIENT], code)
    ok = code == _STEP_CODE[StepStatus.OK]

    # Divide only where shs > 0 is known; select (not multiply) so 0·NaN cannot leak.
    scale = torch.where(ok, torch.sqrt(2.0 * max_kl / torch.where(ok, shs, 1.0)), 0.0)
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


@dataclass(frozen=True)
class LineSearchResult:
    """Result of :func:`line_search`; 0-d tensors on ``theta_old``'s device.

    Attributes:
        theta: The accepted point, or a bit-for-bit copy of ``theta_old``.
        accepted: Whether a candidate was accepted (bool).
        step_fraction: ``shrinkᵏ`` of the accepted candidate, 0 when none.
        improvement: ``f(θ) − f(θ_old)`` of the accepted candidate, or of the last
            candidate tried when none was accepted (for diagnostics).
        constraint: The constraint at the same candidate.
        tries: Candidates up to and including the accepted one (``max_tries`` when
            none). The batched variant evaluates all of them regardless.
    """

    theta: Tensor
    accepted: Tensor
    step_fraction: Tensor
    improvement: Tensor
    constraint: Tensor
    tries: Tensor


def _check_line_search_args(
    theta_old: Tensor,
    step: Tensor,
    max_constraint: float,
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
    if not (math.isfinite(max_constraint) and max_constraint > 0):
        raise ValueError(f"max_constraint must be a finite number > 0, got {max_constraint}")
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
    max_constraint: float,
    expected_improvement: float | Tensor | None = None,
    shrink: float = 0.8,
    max_tries: int = 10,
    accept_ratio: float = 0.0,
    constraint_slack: float = 1.0,
    objective_old: float | Tensor | None = None,
    batched: bool = False,
) -> LineSearchResult:
    """Backtracking line search on ``θ_old + shrinkᵏ Δθ``, ``k = 0 .. max_tries − 1``.

    Accepts the first candidate with

    * ``f(θ) − f(θ_old) > 0`` and ``≥ accept_ratio · expected_improvement · shrinkᵏ``
      (the second test only when ``expected_improvement`` is given),
    * ``c(θ) ≤ constraint_slack · max_constraint``,
    * both ``f(θ)`` and ``c(θ)`` finite (a NaN/inf candidate is rejected).

    If none qualifies, ``theta`` is a copy of ``θ_old`` (bit for bit) and
    ``accepted`` is False. The seed notes halve the step (``shrink=0.5``); 0.8 is
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
        max_constraint: The bound ``δ > 0`` on ``c``.
        expected_improvement: ``gᵀΔθ`` of the full step (linear model), or None.
        shrink: Backtracking factor in ``(0, 1)``.
        max_tries: Number of candidates, ``≥ 1``.
        accept_ratio: ``≥ 0``; required fraction of the expected improvement.
        constraint_slack: ``> 0``; the constraint bound is ``slack · max_constraint``.
        objective_old: ``f(θ_old)`` if already known (saves one evaluation).
        batched: Evaluate all candidates at once, select on device (see above).

    Returns:
        A :class:`LineSearchResult`.

    Raises:
        ValueError: Invalid ``shrink``, ``max_tries``, ``max_constraint``,
            ``accept_ratio``, ``constraint_slack``, or ``step`` not matching
            ``theta_old``; a function returning a non-scalar (sequential) or not
            ``(m,)`` (batched).
    """
    max_constraint = float(max_constraint)
    shrink = float(shrink)
    accept_ratio = float(accept_ratio)
    constraint_slack = float(constraint_slack)
    _check_line_search_args(
        theta_old, step, max_constraint, shrink, max_tries, accept_ratio, constraint_slack
    )
    max_tries = int(max_tries)
    bound = constraint_slack * max_constraint
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
                )
        return LineSearchResult(
            theta=theta_old.clone(),
            accepted=torch.zeros((), dtype=torch.bool, device=theta_old.device),
            step_fraction=torch.zeros((), dtype=theta_old.dtype, device=theta_old.device),
            improvement=improvement,
            constraint=constraint,
            tries=torch.full((), max_tries, dtype=torch.int64, device=theta_old.device),
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
    return LineSearchResult(
        theta=theta,
        accepted=any_ok,
        step_fraction=torch.where(any_ok, fracs.index_select(0, pick)[0], 0.0),
        improvement=improvement.index_select(0, pick)[0],
        constraint=c.index_select(0, pick)[0],
        tries=torch.where(any_ok, pick[0] + 1, max_tries),
    )
