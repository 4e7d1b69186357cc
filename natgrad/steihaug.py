"""Steihaug–Toint truncated CG for the trust-region subproblem.

Solves, approximately, ::

    min_p  m(p) = gᵀp + ½ pᵀAp    subject to   ‖p‖_M ≤ Δ

for a symmetric (possibly indefinite or singular) ``A`` given matrix-free, where
``‖p‖_M = sqrt(pᵀMp)`` is the norm of the preconditioner ``M`` (the Euclidean norm
without one). It is CG on ``A p = −g`` started at ``p₀ = 0`` (Nocedal & Wright,
*Numerical Optimization*, 2nd ed., Algorithm 7.2; Steihaug 1983, Toint 1981), with
three ways out::

    r₀ = −g,  z₀ = M⁻¹r₀,  d₀ = z₀,  p₀ = 0
    repeat:
        q = A d                                   one operator application
        if dᵀq ≤ 0:  return p + τd on the boundary, τ the root of ‖p + τd‖_M = Δ
                     with the smaller model value       (NEGATIVE_CURVATURE)
        α = rᵀz / dᵀq
        if ‖p + αd‖_M ≥ Δ:  return p + τd, τ ≥ 0 with ‖p + τd‖_M = Δ   (BOUNDARY)
        p ← p + αd,  r ← r − αq
        if ‖r‖ ≤ max(rtol·‖g‖, atol):  return p                       (CONVERGED)
        z = M⁻¹r,  β = r'ᵀz' / rᵀz,  d ← z + βd

Since CG's iterates grow monotonically in ``‖·‖_M`` (Steihaug's theorem), the first
exit from the region is the right place to stop. ``‖p‖_M``, ``pᵀMd`` and ``dᵀMd`` are
updated by the recursions of Gould, Lucidi, Roma & Toint (1999, §2) so that ``M`` itself
is never needed, only ``M⁻¹``::

    ‖p + αd‖²_M = ‖p‖²_M + 2α pᵀMd + α² dᵀMd
    p'ᵀMd' = β (pᵀMd + α dᵀMd),      d'ᵀMd' = r'ᵀz' + β² dᵀMd

The residual ``r = −g − Ap`` is kept up to date (also by the final boundary step), so
the model value ``m(p) = ½ (gᵀp − pᵀr)`` costs no further operator application.

Like :func:`natgrad.cg.cg_solve`, ``g`` may be one vector ``(n,)`` or a block ``(n, k)``
of independent subproblems sharing ``A`` (with per-column radii), and with
``rtol == atol == 0`` the solver runs exactly ``maxiter`` iterations with no host
synchronisation: every exit is a tensor flag, stopped columns are frozen with
:func:`torch.where`.

Example:
    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)  # indefinite
    >>> g = torch.tensor([1.0, 0.5], dtype=torch.float64)
    >>> res = steihaug_solve(A, g, radius=2.0)
    >>> res.status, round(float(res.p.norm()), 12)
    (<SteihaugStatus.NEGATIVE_CURVATURE: 'negative_curvature'>, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from natgrad.cg import _check_tolerance
from natgrad.cg_loops import _allfinite, _dot
from natgrad.krylov_basis import KrylovBasis
from natgrad.matvec import as_matvec
from natgrad.status import ResultStatus, SolverError, Status

__all__ = ["SteihaugError", "SteihaugResult", "SteihaugStatus", "steihaug_solve"]


class SteihaugStatus(Status):
    """Why :func:`steihaug_solve` stopped (per column), mildest first."""

    CONVERGED = (
        "converged",
        "interior solution: ‖g + Ap‖ ≤ max(rtol·‖g‖, atol) with ‖p‖_M < radius",
        True,
    )
    BOUNDARY = (
        "boundary",
        "the CG path left the trust region: p was cut at ‖p‖_M = radius (the usual "
        "trust-region step when the Newton step is longer than the radius)",
        True,
    )
    NEGATIVE_CURVATURE = (
        "negative_curvature",
        "dᵀAd ≤ 0 (A is indefinite or singular along d): p follows d to the boundary "
        "‖p‖_M = radius, where the model decreases further",
        True,
    )
    MAX_ITERATIONS = (
        "max_iterations",
        "reached maxiter inside the region before ‖g + Ap‖ ≤ max(rtol·‖g‖, atol); p is "
        "still a descent step (fine for truncated CG: raise_if_failed(allow="
        "('max_iterations',))), or raise maxiter / add a preconditioner M",
        False,
    )
    INDEFINITE_PRECONDITIONER = (
        "indefinite_preconditioner",
        "rᵀM⁻¹r ≤ 0 with r ≠ 0: the preconditioner is not positive definite; M must apply "
        "the inverse of a symmetric positive definite matrix (e.g. r / d, d > 0)",
        False,
    )
    NON_FINITE = (
        "non_finite",
        "a NaN or inf appeared in A @ d, M⁻¹r or the iterates; p is the last finite "
        "iterate; check the operator, g and the dtype",
        False,
    )


class SteihaugError(SolverError):
    """Raised by :meth:`SteihaugResult.raise_if_failed`; ``.result`` holds the result."""


@dataclass(frozen=True)
class SteihaugResult(ResultStatus):
    """Result of :func:`steihaug_solve`; per-column fields are ``()`` or ``(k,)`` tensors.

    Building it never synchronises with the host; :attr:`status`, :attr:`success`,
    :attr:`message` and :meth:`raise_if_failed` do.

    Attributes:
        p: The step, shape of ``g``.
        model_value: ``m(p) = gᵀp + ½pᵀAp`` per column (≤ 0 up to rounding).
        p_norm: ``‖p‖_M`` per column.
        on_boundary: Whether ``p`` is on the boundary (``BOUNDARY`` or
            ``NEGATIVE_CURVATURE``), per column (bool).
        iterations: Operator applications spent per column (int64): CG updates plus the
            final boundary step.
        residual: ``r = −g − Ap`` (recursively updated), shape of ``g``.
        radius: The radius per column.
        tolerance: ``max(rtol·‖g‖, atol)`` per column.
        matvecs: Operator applications done (a Python int, the same for every column).
        maxiter: The iteration limit used.
        status_code: Per-column :class:`SteihaugStatus` codes; read :attr:`statuses`.
    """

    status_type = SteihaugStatus
    error_type = SteihaugError

    p: Tensor
    model_value: Tensor
    p_norm: Tensor
    on_boundary: Tensor
    iterations: Tensor
    residual: Tensor
    radius: Tensor
    tolerance: Tensor
    matvecs: int
    maxiter: int
    status_code: Tensor


_CODE = {s: SteihaugStatus.code(s) for s in SteihaugStatus}


def _colnorm(u: Tensor) -> Tensor:
    return torch.linalg.vector_norm(u, dim=0)


def _radius_tensor(radius: Any, g: Tensor) -> Tensor:
    """``radius`` as a per-column tensor; ValueError unless finite and > 0 (one sync)."""
    per_col = g.shape[1:]
    if isinstance(radius, Tensor):
        r = radius.to(dtype=g.dtype, device=g.device)
        if r.ndim != 0 and tuple(r.shape) != tuple(per_col):
            raise ValueError(
                f"radius must be a number or a tensor of shape {tuple(per_col)}, got "
                f"{tuple(r.shape)}"
            )
        r = r.expand(per_col)
        if not bool(((r > 0) & torch.isfinite(r)).all()):
            raise ValueError("radius must be finite and > 0 in every column")
        return r
    if isinstance(radius, bool) or not isinstance(radius, int | float):
        raise ValueError(f"radius must be a number or a tensor, got {type(radius).__name__}")
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    return torch.full(per_col, float(radius), dtype=g.dtype, device=g.device)


def _boundary_taus(pmp: Tensor, pmd: Tensor, dmd: Tensor, rad2: Tensor) -> tuple[Tensor, Tensor]:
    """Both roots ``τ₋ ≤ 0 ≤ τ₊`` of ``‖p + τd‖²_M = Δ²`` (``dmd > 0`` where used).

    ``dmd·τ² + 2·pmd·τ + (pmp − Δ²) = 0`` with ``pmp ≤ Δ²``; each root is taken in the
    cancellation-free form (``c / (…)`` for the small one).
    """
    c = torch.clamp(pmp - rad2, max=0.0)
    safe = torch.where(dmd > 0, dmd, 1.0)
    s = torch.sqrt(torch.clamp(pmd * pmd - safe * c, min=0.0))
    # s ≥ |pmd|; q has the sign of −pmd and |q| = |pmd| + s, so roots are q/a and c/q.
    q = torch.where(pmd >= 0, -(pmd + s), s - pmd)
    q_safe = torch.where(q != 0, q, 1.0)
    r1 = q / safe
    r2 = torch.where(q != 0, c / q_safe, 0.0)
    return torch.minimum(r1, r2), torch.maximum(r1, r2)


def steihaug_solve(
    A: Any,
    g: Tensor,
    radius: float | Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    check_finite: bool = True,
    reorthogonalize: bool = False,
) -> SteihaugResult:
    """Approximately minimise ``gᵀp + ½pᵀAp`` subject to ``‖p‖_M ≤ radius``.

    The algorithm and its exits are in the module docstring. The stopping rule, per
    column: ``‖r‖ ≤ max(rtol·‖g‖, atol)`` for the recursively updated ``r = −g − Ap``
    (checked before the first iteration and after each interior update), a boundary
    exit, or ``maxiter`` operator applications. ``g = 0`` gives ``p = 0`` and
    ``CONVERGED`` (as Nocedal & Wright's Algorithm 7.2).

    With ``rtol == atol == 0`` (fixed-iteration mode) exactly ``maxiter`` operator
    applications are made and the loop never synchronises with the host; with
    ``check_finite=False`` and a tensor radius the whole call is sync-free.

    Cost: ``result.matvecs`` operator applications; ``M`` (which applies ``M⁻¹``) once
    before the loop and once per interior iteration.

    Args:
        A: Symmetric operator: a :class:`natgrad.linop.LinearOperator`, a dense
            ``(n, n)`` tensor, a scipy matrix/operator or a callable ``v -> A v`` that
            accepts the shape of ``g`` (as :func:`natgrad.cg.cg_solve` accepts).
        g: The gradient (linear term), ``(n,)`` or a block ``(n, k)``, real floating.
        radius: ``Δ > 0``, a number or a tensor ``()`` / ``(k,)`` (per column).
        rtol: Relative tolerance on ``‖g + Ap‖`` (default 1e-5).
        atol: Absolute tolerance (default 0).
        maxiter: Limit on operator applications, ``≥ 1``; default ``10·n``.
        M: Preconditioner applying ``M⁻¹`` (same kinds as ``A``); it also defines the
            trust-region norm ``‖p‖_M = sqrt(pᵀMp)``.
        check_finite: Raise ``ValueError`` if ``g`` holds NaN/inf or ``radius`` is not
            finite and positive (host syncs before the loop); with ``False`` such input
            (``g``) gives ``NON_FINITE`` instead.
        reorthogonalize: Project every new residual out of the previous ones
            (:class:`natgrad.krylov_basis.KrylovBasis`; ``M⁻¹``-orthogonality with a
            preconditioner). The iterates are those of exact arithmetic: on a badly
            conditioned ``A`` CG then needs at most ``n`` products where plain CG may need
            many times that. Costs ``n × iterations`` stored values and ``O(n)`` flops per
            stored vector per iteration; one vector ``g`` in tolerance mode only.

    Returns:
        A :class:`SteihaugResult`.

    Raises:
        ValueError: ``g`` not 1-D/2-D floating; bad ``radius``, ``rtol``, ``atol`` or
            ``maxiter``; shape/dtype/device mismatch of ``A`` or ``M``; non-finite ``g``;
            ``reorthogonalize`` with a block ``g`` or in fixed-iteration mode.
        TypeError: ``A`` or ``M`` is of an unsupported kind.
    """
    if not isinstance(g, Tensor) or g.ndim not in (1, 2) or not g.dtype.is_floating_point:
        got = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"g must be a real floating tensor of shape (n,) or (n, k), got {got}")
    rtol = _check_tolerance("rtol", rtol)
    atol = _check_tolerance("atol", atol)
    if maxiter is None:
        maxiter = max(10 * g.shape[0], 1)
    if isinstance(maxiter, bool) or not isinstance(maxiter, Integral) or maxiter < 1:
        raise ValueError(f"maxiter must be an int >= 1, got {maxiter!r}")
    maxiter = int(maxiter)
    if check_finite:
        rad = _radius_tensor(radius, g)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("g contains NaN or inf (pass check_finite=False to get a status)")
    elif isinstance(radius, Tensor):
        rad = radius.to(dtype=g.dtype, device=g.device).expand(g.shape[1:])
    else:
        rad = _radius_tensor(radius, g)
    matvec = as_matvec(A, g, "A")
    precond = None if M is None else as_matvec(M, g, "M")
    if g.ndim == 1 and (rtol > 0.0 or atol > 0.0):
        basis = KrylovBasis(g, maxiter + 1, precond is not None) if reorthogonalize else None
        return _host_loop(matvec, precond, g, rad, rtol, atol, maxiter, basis)
    if reorthogonalize:
        raise ValueError("reorthogonalize needs one vector g of shape (n,) and rtol or atol > 0")
    return _tensor_loop(matvec, precond, g, rad, rtol, atol, maxiter)


def _npc_tau(tau_lo: Tensor, tau_hi: Tensor, dr: Tensor, dq: Tensor) -> Tensor:
    """Of the two boundary points along ``d`` (``dᵀAd ≤ 0``), the one with the smaller model.

    ``m(p + τd) − m(p) = −τ dᵀr + ½τ² dᵀAd`` with ``r = −g − Ap``.
    """
    m_lo = -tau_lo * dr + 0.5 * tau_lo * tau_lo * dq
    m_hi = -tau_hi * dr + 0.5 * tau_hi * tau_hi * dq
    return torch.where(m_lo < m_hi, tau_lo, tau_hi)


def _append_scaled(basis: KrylovBasis, z: Tensor, r: Tensor, rz: float) -> None:
    """Add the residual as ``q = z/√(rᵀz)``, ``Mq = r/√(rᵀz)`` (one vector without ``M``)."""
    basis.append(z, r, 1.0 / math.sqrt(rz))


def _host_loop(matvec, precond, g: Tensor, rad: Tensor, rtol, atol, maxiter,
               basis: KrylovBasis | None) -> SteihaugResult:
    """One vector in tolerance mode: the scalars live on the host as Python floats.

    Tolerance mode synchronises every iteration anyway, so reading ``dᵀq``, ``‖r‖`` and
    ``rᵀz`` as floats costs nothing extra and replaces the ~40 small masked kernels per
    iteration of :func:`_tensor_loop` by five vector kernels (``dᵀq``, two axpys, ``rᵀr``,
    the new direction) and two reads: the per-iteration overhead decides the speed of small
    problems. Same iteration, same results. With a ``basis``, the residuals are
    reorthogonalised against it (``steihaug_solve(reorthogonalize=True)``).
    """
    S = SteihaugStatus
    rad2 = float(rad) ** 2
    r = -g
    z = r if precond is None else precond(r)
    d, p = z, torch.zeros_like(g)
    rz, rnorm = float(_dot(r, z)), float(_colnorm(r))
    tol = max(rtol * rnorm, atol)
    pmp, pmd, dmd = 0.0, 0.0, rz
    matvecs = iterations = 0
    if not (math.isfinite(rz) and math.isfinite(rnorm)):
        status = S.NON_FINITE
    elif rnorm <= tol:
        status = S.CONVERGED
    elif rz <= 0:
        status = S.CONVERGED if precond is None else S.INDEFINITE_PRECONDITIONER
    else:
        status = S.MAX_ITERATIONS
    if basis is not None and status is S.MAX_ITERATIONS:
        _append_scaled(basis, z, r, rz)
    while status is S.MAX_ITERATIONS and matvecs < maxiter:
        q = matvec(d)
        matvecs += 1
        dq = float(torch.dot(d, q))
        alpha = rz / dq if dq > 0 else 0.0
        pmp_next = pmp + 2 * alpha * pmd + alpha * alpha * dmd
        if not math.isfinite(dq):
            status = S.NON_FINITE
        elif dq <= 0 or pmp_next >= rad2:
            host = [torch.tensor(v, dtype=torch.float64) for v in (pmp, pmd, dmd, rad2, dq)]
            lo, hi = _boundary_taus(*host[:4])
            tau = hi if dq > 0 else _npc_tau(lo, hi, _dot(d, r).to("cpu", torch.float64), host[4])
            p, r = torch.add(p, d, alpha=float(tau)), torch.sub(r, q, alpha=float(tau))
            pmp, iterations = rad2, iterations + 1
            status = S.BOUNDARY if dq > 0 else S.NEGATIVE_CURVATURE
        else:
            # Fused axpys (one kernel each): the per-iteration overhead decides small problems.
            p_next, r_next = torch.add(p, d, alpha=alpha), torch.sub(r, q, alpha=alpha)
            if basis is not None:
                r_next = basis.project_out(r_next)
            rr = float(torch.dot(r_next, r_next))  # ‖r‖² (and rᵀz without M): one kernel
            if not math.isfinite(rr):
                status = S.NON_FINITE
                break
            p, r, pmp, iterations = p_next, r_next, pmp_next, iterations + 1
            if math.sqrt(rr) <= tol:
                status = S.CONVERGED
                break
            z = r if precond is None else precond(r)
            rz_next = rr if precond is None else float(torch.dot(r, z))
            if not math.isfinite(rz_next):
                status = S.NON_FINITE
            elif rz_next <= 0:
                status = S.CONVERGED if precond is None else S.INDEFINITE_PRECONDITIONER
            else:
                beta = rz_next / rz
                pmd, dmd = beta * (pmd + alpha * dmd), rz_next + beta * beta * dmd
                d, rz = torch.add(z, d, alpha=beta), rz_next
                if basis is not None:
                    _append_scaled(basis, z, r, rz)
    return _result(g, p, r, pmp, rad, tol, iterations, matvecs, maxiter, S.code(status))


def _tensor_loop(matvec, precond, g: Tensor, rad: Tensor, rtol, atol, maxiter) -> SteihaugResult:
    """The iteration of the module docstring, per column with tensor flags (no host sync)."""
    fixed = rtol == 0.0 and atol == 0.0
    rad2 = rad * rad
    r = -g
    z = r if precond is None else precond(r)
    d = z.clone()
    rz = _dot(r, z)
    p = torch.zeros_like(g)
    rnorm = _colnorm(r)
    tol = torch.clamp(rtol * rnorm, min=atol)
    pmp = torch.zeros_like(rnorm)
    pmd = torch.zeros_like(rnorm)
    dmd = rz.clone()  # d₀ = M⁻¹r₀, so d₀ᵀMd₀ = r₀ᵀz₀
    finite = _allfinite(g) & torch.isfinite(rz) & _allfinite(z)
    done = finite & (rnorm <= tol)
    bad_m = finite & ~done & (rz <= 0)
    code = torch.full(rnorm.shape, _CODE[SteihaugStatus.MAX_ITERATIONS], dtype=torch.int8,
                      device=g.device)
    code = torch.where(~finite, _CODE[SteihaugStatus.NON_FINITE], code)
    code = torch.where(done, _CODE[SteihaugStatus.CONVERGED], code)
    code = torch.where(bad_m, _CODE[SteihaugStatus.INDEFINITE_PRECONDITIONER], code)
    active = finite & ~done & ~bad_m
    iterations = torch.zeros(rnorm.shape, dtype=torch.int64, device=g.device)
    matvecs = 0
    for _ in range(maxiter):
        if not fixed and not bool(active.any()):  # tolerance mode: one host check per iteration
            break
        q = matvec(torch.where(active, d, 0.0))
        matvecs += 1
        dq = _dot(d, q)
        ok = active & _allfinite(q) & torch.isfinite(dq)
        nonfinite = active & ~ok
        npc = ok & (dq <= 0)
        pos = ok & (dq > 0)
        alpha = torch.where(pos, rz / torch.where(pos, dq, 1.0), 0.0)
        pmp_next = pmp + 2 * alpha * pmd + alpha * alpha * dmd
        leaves = pos & (pmp_next >= rad2)
        interior = pos & ~leaves
        tau_lo, tau_hi = _boundary_taus(pmp, pmd, dmd, rad2)
        tau_npc = _npc_tau(tau_lo, tau_hi, _dot(d, r), dq)
        to_boundary = npc | leaves
        step = torch.where(interior, alpha, torch.where(leaves, tau_hi, tau_npc))
        moved = interior | to_boundary
        p_new = p + step * d
        r_new = r - step * q
        ok_new = _allfinite(p_new) & _allfinite(r_new)
        nonfinite = nonfinite | (moved & ~ok_new)
        moved = moved & ok_new
        interior = interior & ok_new
        to_boundary = to_boundary & ok_new
        p = torch.where(moved, p_new, p)
        r = torch.where(moved, r_new, r)
        pmp = torch.where(interior, pmp_next, torch.where(to_boundary, rad2, pmp))
        iterations = iterations + moved.to(torch.int64)
        rnorm = torch.where(moved, _colnorm(r), rnorm)
        converged = interior & (rnorm <= tol)
        cont = interior & ~converged

        z = r if precond is None else precond(r)
        rz_next = _dot(r, z)
        z_ok = torch.isfinite(rz_next) & (_allfinite(z) if precond is not None else True)
        nonfinite = nonfinite | (cont & ~z_ok)
        broke_m = cont & z_ok & (rz_next <= 0)
        cont = cont & z_ok & (rz_next > 0)
        beta = torch.where(cont, rz_next / torch.where(cont, rz, 1.0), 0.0)
        pmd = torch.where(cont, beta * (pmd + alpha * dmd), pmd)
        dmd = torch.where(cont, rz_next + beta * beta * dmd, dmd)
        d = torch.where(cont, z + beta * d, d)
        rz = torch.where(cont, rz_next, rz)

        code = torch.where(converged, _CODE[SteihaugStatus.CONVERGED], code)
        code = torch.where(leaves & moved, _CODE[SteihaugStatus.BOUNDARY], code)
        code = torch.where(npc & moved, _CODE[SteihaugStatus.NEGATIVE_CURVATURE], code)
        # Without M, rᵀr = 0 with ‖r‖ > tol is underflow: the iterate is converged.
        code = torch.where(broke_m, _CODE[SteihaugStatus.CONVERGED if precond is None
                                          else SteihaugStatus.INDEFINITE_PRECONDITIONER], code)
        code = torch.where(nonfinite, _CODE[SteihaugStatus.NON_FINITE], code)
        active = cont
    return _result(g, p, r, pmp, rad, tol, iterations, matvecs, maxiter, code)


def _result(g, p, r, pmp, rad, tol, iterations, matvecs, maxiter, code) -> SteihaugResult:
    """Package the final state; ``m(p) = ½(gᵀp − pᵀr)`` since ``Ap = −g − r``."""
    like = torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device)
    code = torch.as_tensor(code, dtype=torch.int8, device=g.device).expand(like.shape)
    boundary = (code == _CODE[SteihaugStatus.BOUNDARY]) | (
        code == _CODE[SteihaugStatus.NEGATIVE_CURVATURE]
    )
    return SteihaugResult(
        p=p,
        model_value=0.5 * (_dot(g, p) - _dot(p, r)),
        p_norm=torch.sqrt(torch.clamp(like + pmp, min=0.0)),
        on_boundary=boundary,
        iterations=torch.as_tensor(iterations, dtype=torch.int64, device=g.device),
        residual=r,
        radius=rad,
        tolerance=like + tol,
        matvecs=matvecs,
        maxiter=maxiter,
        status_code=code,
    )
