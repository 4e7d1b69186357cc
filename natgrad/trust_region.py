"""The trust-region step of natural-gradient methods (TRPO) and its line search.

The seed notes solve ``max g·Δθ  s.t.  ½ Δθᵀ H Δθ ≤ δ`` with the Lagrangian: the
step lies along the natural gradient ``s = H⁻¹g`` and is scaled to the boundary,
``Δθ = sqrt(2δ / gᵀH⁻¹g) · H⁻¹g``. :func:`natural_step` computes ``s`` by CG on
the damped operator ``H + λI`` and scales with ``sᵀ(H + λI)s`` (the same
operator CG solved with, as the peer implementations do), so that
``½ Δθᵀ(H + λI)Δθ = δ`` exactly. Because the model is only quadratic,
:func:`~natgrad.backtracking.line_search` (its own module, re-exported here) then
backtracks ``θ_old + shrinkᵏ Δθ`` until the true objective improves and the true
constraint (mean KL) holds.

Example:
    >>> import torch
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 8.0]], dtype=torch.float64)
    >>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    >>> st = natural_step(g, H, delta=0.01)
    >>> st.status, round(float(0.5 * st.step @ H @ st.step), 12)
    (<StepStatus.OK: 'ok'>, 0.01)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from natgrad.backtracking import (  # re-exported: natgrad.trust_region.line_search keeps working
    LineSearchResult,
    LineSearchStatus,
    check_delta,
    line_search,
    renamed,
)
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
    delta = check_delta(renamed("delta", delta, "max_kl", max_kl, "natural_step"))
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
