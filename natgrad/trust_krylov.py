"""GLTR: the trust-region subproblem solved in a growing Lanczos (Krylov) subspace.

Solves, to a tolerance, ::

    min_p  m(p) = gᵀp + ½ pᵀAp    subject to   ‖p‖_M ≤ Δ

for a symmetric ``A`` (``(n, n)``, possibly indefinite or singular) given matrix-free,
``g`` of shape ``(n,)``, and ``‖p‖_M = sqrt(pᵀMp)`` (Euclidean without a preconditioner).
This is the generalised Lanczos trust-region method of Gould, Lucidi, Roma & Toint (1999),
the method behind scipy's ``trust-krylov`` (``_trlib``; Nocedal & Wright, *Numerical
Optimization*, 2nd ed., §7.2). Lanczos from ``g`` builds, after ``k`` operator products,
an ``M``-orthonormal basis ``Q_k`` (``n × k``, ``Q_kᵀMQ_k = I``) with ::

    A Q_k = M Q_k T_k + r_{k+1} e_kᵀ,    g = ‖g‖_{M⁻¹} M q_1,    T_k tridiagonal (k × k)

so that for ``p = Q_k y``: ``m(p) = ½ yᵀT_k y + ‖g‖_{M⁻¹} e_1ᵀy`` and ``‖p‖_M = ‖y‖``. The
small problem ::

    min_y  ½ yᵀT_k y + ‖g‖_{M⁻¹} e_1ᵀy    subject to   ‖y‖ ≤ Δ

is solved exactly, in two phases as in GLTR. While ``T_k ≻ 0`` and the interior solution
``y = −‖g‖_{M⁻¹}T_k⁻¹e_1`` lies inside the region (CG's iterate, in the Lanczos basis), its
norm and last component follow from an ``LDLᵀ`` factorisation of ``T_k`` updated by scalars
(:class:`_InteriorPhase`, O(1) per step). From the first step where it leaves the region
or ``T_k`` is not positive definite on, the small problem is solved in full
(:func:`tridiagonal_subproblem`: Moré–Sorensen on the eigendecomposition
``T_k = S diag(θ) Sᵀ`` by :func:`torch.linalg.eigh`, ``y(λ) = −(T_k + λI)⁻¹‖g‖e_1``, ``λ ≥
max(0, −θ_min)`` the root of ``‖y(λ)‖ = Δ`` or ``0`` for an interior solution, hard case
included). Since ``g + (A + λM)p = r_{k+1} e_kᵀy``, the stopping rule is ::

    ‖r_{k+1}‖ · |e_kᵀ y| ≤ max(rtol·‖g‖, atol)       (the KKT residual, Euclidean)

or ``maxiter`` products, or an invariant subspace (``‖r_{k+1}‖_{M⁻¹} ≈ 0``; with ``k = n``
the basis is complete and ``p`` is the global minimiser up to rounding). ``p = Q_k y``.

Unlike Steihaug's truncated CG (:mod:`natgrad.steihaug`), which stops at the first
boundary crossing or negative curvature, GLTR keeps improving on the boundary: ``p`` is the
global minimiser of ``m`` over ``‖p‖_M ≤ Δ`` within the Krylov subspace, so at equal
subspace dimension its model value is never above Steihaug's.

**Hard case** (``g`` orthogonal to the eigenvectors of ``A``'s lowest eigenvalue, which
the Krylov subspace of ``g`` then never contains): the subspace becomes invariant before
``k = n``. With ``explore_invariant=True`` (default) Lanczos restarts once from a fixed
pseudo-random vector ``M``-orthogonal to ``Q_k`` (``T`` becomes block diagonal), and stops
when the new block's lowest Ritz value has converged (Ritz residual ``≤ max(rtol, √eps)·
‖T‖``) and the KKT residual is small, or at the next invariant subspace (scipy's trlib with
``ctl_invariant = TRLIB_CLC_EXP_INV_LOC``; scipy itself does not explore).

Cost and memory: one operator product and one ``M⁻¹`` application per step; the basis
``Q_k`` (and ``MQ_k`` with a preconditioner) is kept, ``n × k`` (×2) of ``g``'s dtype on
its device; full reorthogonalisation against it (twice, ``O(nk)`` per step); in the
second phase one ``eigh`` of ``T_k`` per step on the host (``O(k³)``, fine for ``k`` up to
a few hundred), none in the first; one host synchronisation per step. ``g`` is one vector
(no block of columns).

Example:
    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)  # indefinite
    >>> g = torch.tensor([1.0, 0.5], dtype=torch.float64)
    >>> res = trust_krylov_solve(A, g, radius=2.0)
    >>> res.status, round(float(res.p_norm), 12), res.iterations.item()
    (<TrustKrylovStatus.BOUNDARY: 'boundary'>, 2.0, 2)
    >>> round(float(res.model_value), 6)   # the global minimum of the subproblem
    -3.221911
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, NamedTuple

import torch
from torch import Tensor

from natgrad.cg import _check_tolerance
from natgrad.krylov_basis import KrylovBasis
from natgrad.matvec import as_matvec
from natgrad.status import ResultStatus, SolverError, Status
from natgrad.steihaug import _radius_tensor

__all__ = [
    "TrustKrylovError",
    "TrustKrylovResult",
    "TrustKrylovStatus",
    "tridiagonal_subproblem",
    "trust_krylov_solve",
]


class TrustKrylovStatus(Status):
    """Why :func:`trust_krylov_solve` stopped, mildest first."""

    CONVERGED = (
        "converged",
        "interior solution (λ = 0): ‖g + Ap‖ ≤ max(rtol·‖g‖, atol) with ‖p‖_M < radius",
        True,
    )
    BOUNDARY = (
        "boundary",
        "solution on the boundary ‖p‖_M = radius with multiplier λ > 0: ‖g + (A + λM)p‖ ≤ "
        "max(rtol·‖g‖, atol)",
        True,
    )
    HARD_CASE = (
        "hard_case",
        "hard case: λ = −θ_min and p has a component along the lowest Ritz vector, chosen "
        "to reach the boundary (g is orthogonal to the eigenvectors of that eigenvalue)",
        True,
    )
    MAX_ITERATIONS = (
        "max_iterations",
        "reached maxiter before the KKT residual met the tolerance; p is still the global "
        "minimiser over the Krylov subspace (a descent step: raise_if_failed(allow="
        "('max_iterations',))), or raise maxiter / add a preconditioner M",
        False,
    )
    INDEFINITE_PRECONDITIONER = (
        "indefinite_preconditioner",
        "rᵀM⁻¹r < 0: the preconditioner is not positive definite; M must apply the inverse "
        "of a symmetric positive definite matrix (e.g. r / d, d > 0)",
        False,
    )
    NON_FINITE = (
        "non_finite",
        "a NaN or inf appeared in A @ q, M⁻¹r or the Lanczos coefficients; p is the solution "
        "in the last finite subspace; check the operator, g and the dtype",
        False,
    )


class TrustKrylovError(SolverError):
    """Raised by :meth:`TrustKrylovResult.raise_if_failed`; ``.result`` holds the result."""


@dataclass(frozen=True)
class TrustKrylovResult(ResultStatus):
    """Result of :func:`trust_krylov_solve`; the scalar fields are 0-d tensors.

    Attributes:
        p: The step, shape of ``g``.
        model_value: ``m(p) = gᵀp + ½pᵀAp`` from the small problem (≤ 0).
        p_norm: ``‖p‖_M`` (``= ‖y‖``).
        on_boundary: Whether ``λ > 0`` (``BOUNDARY`` or ``HARD_CASE``), bool.
        iterations: Lanczos steps = operator applications (int64).
        multiplier: The Lagrange multiplier ``λ ≥ 0`` of the small problem.
        kkt_residual: ``‖r_{k+1}‖·|e_kᵀy|``, the norm of ``g + (A + λM)p``.
        radius: The radius ``Δ``.
        tolerance: ``max(rtol·‖g‖, atol)``.
        matvecs: Operator applications (a Python int, equal to ``iterations``).
        maxiter: The step limit used.
        status_code: :class:`TrustKrylovStatus` code; read :attr:`status`.
    """

    status_type = TrustKrylovStatus
    error_type = TrustKrylovError

    p: Tensor
    model_value: Tensor
    p_norm: Tensor
    on_boundary: Tensor
    iterations: Tensor
    multiplier: Tensor
    kkt_residual: Tensor
    radius: Tensor
    tolerance: Tensor
    matvecs: int
    maxiter: int
    status_code: Tensor


_EPS64 = torch.finfo(torch.float64).eps


def _secular_root(theta: Tensor, c: Tensor, radius: float, lo: float, hi: float) -> float:
    """``λ ∈ (lo, hi]`` with ``‖c / (θ + λ)‖ = radius`` (``‖·‖`` decreasing in ``λ``).

    Newton on ``φ(λ) = 1/‖y(λ)‖ − 1/Δ`` (nearly linear: Moré & Sorensen 1983), kept inside
    the bracket ``[a, b]`` with ``‖y(a)‖ > Δ ≥ ‖y(b)‖``, bisection when Newton leaves it;
    stops at ``|‖y‖ − Δ| ≤ 1e-14·Δ`` or when the bracket is down to rounding (then ``b``).
    """
    a, b, lam = lo, hi, hi
    for _ in range(200):
        d = theta + lam
        y = c / d
        ny = float(torch.linalg.vector_norm(y))
        if ny > radius:
            a = lam
        else:
            b = lam
        if abs(ny - radius) <= 1e-14 * radius:
            return lam
        if b - a <= 4 * _EPS64 * abs(b):
            break
        dphi = float((y * y / d).sum()) / ny**3  # dφ/dλ > 0
        step = lam - (1.0 / ny - 1.0 / radius) / dphi if dphi > 0 else math.nan
        lam = step if a < step < b else 0.5 * (a + b)
    return b  # the bracket end with ‖y(b)‖ ≤ Δ: feasible


def tridiagonal_subproblem(T: Tensor, gnorm: float, radius: float) -> tuple[Tensor, float, bool]:
    """The global minimiser of ``½yᵀTy + gnorm·y₁`` subject to ``‖y‖ ≤ radius``.

    ``T`` is a small symmetric ``(k, k)`` float64 matrix (any symmetric matrix works; GLTR
    passes its tridiagonal ``T_k``), ``gnorm > 0``. With ``T = S diag(θ) Sᵀ`` and ``c =
    gnorm·Sᵀe_1``, the solution is ``y = S u``, ``u_i = −c_i / (θ_i + λ)``, where ``λ = 0``
    if ``θ_min ≥ 0`` and that step is inside, else ``λ > max(0, −θ_min)`` solves
    ``‖u‖ = radius`` (:func:`_secular_root`). Hard case: if the components ``c_i`` of the
    lowest eigenvalue vanish (or the root is within rounding of ``−θ_min``) and the step
    from the others, at ``λ = −θ_min > 0``, is inside, ``u`` gets ``τ`` along the lowest
    eigenvector with ``‖u‖ = radius`` (Nocedal & Wright §4.3).

    Returns:
        ``(y, λ, hard)``: ``y`` of shape ``(k,)`` float64, the multiplier, whether the hard
        case formula was used.
    """
    theta, S = torch.linalg.eigh(T)
    c = gnorm * S[0]
    tol = 10 * T.shape[0] * _EPS64 * max(float(theta.abs().max()), gnorm / radius)
    lo = max(0.0, -float(theta[0]))
    lo = 0.0 if lo <= tol else lo
    pole = theta + lo <= tol  # the eigenvalues at the singularity of y(λ) (lowest, shifted)
    u = -torch.where(pole, 0.0, c / torch.where(pole, 1.0, theta + lo))
    un = float(torch.linalg.vector_norm(u))
    c_pole = float(torch.linalg.vector_norm(c[pole]))
    if un <= radius:
        slack = math.sqrt(max(radius * radius - un * un, 0.0))
        if c_pole == 0.0 or (slack > 0 and c_pole / slack <= tol):
            if lo == 0.0:
                return S @ u, 0.0, False  # interior (T ⪰ 0 and the step is inside)
            first = torch.zeros_like(c)
            first[int(pole.nonzero()[0])] = 1.0
            direction = -c / c_pole if c_pole > 0 else first
            return S @ (u + slack * torch.where(pole, direction, 0.0)), lo, True
    hi = lo + tol + float(torch.linalg.vector_norm(c)) / radius  # ‖y(hi)‖ ≤ radius
    lam = _secular_root(theta, c, radius, lo, hi)
    return S @ (-c / (theta + lam)), lam, False


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        b = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    return T


def trust_krylov_solve(
    A: Any,
    g: Tensor,
    radius: float | Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    check_finite: bool = True,
    explore_invariant: bool = True,
) -> TrustKrylovResult:
    """Minimise ``gᵀp + ½pᵀAp`` subject to ``‖p‖_M ≤ radius`` by GLTR (Lanczos).

    The method, the formula and the stopping rule are in the module docstring: stop when
    ``‖g + (A + λM)p‖ = ‖r_{k+1}‖·|e_kᵀy| ≤ max(rtol·‖g‖, atol)`` (checked after every
    Lanczos step), at an invariant subspace (after at most one restart, see
    ``explore_invariant``), or after ``maxiter`` steps. ``g = 0`` gives ``p = 0`` and
    ``CONVERGED``.

    Args:
        A: Symmetric operator: a :class:`natgrad.linop.LinearOperator`, a dense ``(n, n)``
            tensor, a scipy matrix/operator or a callable ``v -> A v`` (as
            :func:`natgrad.steihaug.steihaug_solve` accepts, via
            :func:`natgrad.matvec.as_matvec`).
        g: The gradient (linear term), ``(n,)``, real floating (float32 or float64, any
            device).
        radius: ``Δ > 0``, a number or a 0-d tensor.
        rtol: Relative tolerance on the KKT residual (default 1e-5).
        atol: Absolute tolerance (default 0).
        maxiter: Lanczos steps at most, ``≥ 1``; default and cap ``n`` (the basis is then
            complete). The memory is ``n × maxiter`` values at most.
        M: Preconditioner applying ``M⁻¹`` (same kinds as ``A``); it defines the norm
            ``‖p‖_M`` of the region.
        check_finite: Raise ``ValueError`` on a non-finite ``g`` (one host sync); with
            ``False`` it gives ``NON_FINITE`` instead.
        explore_invariant: At an invariant subspace before ``k = n``, restart once
            (module docstring) instead of stopping, so that the hard case is solved.

    Returns:
        A :class:`TrustKrylovResult`.

    Raises:
        ValueError: ``g`` not a 1-D floating tensor; ``radius`` not finite and > 0; bad
            ``rtol``, ``atol`` or ``maxiter``; shape/dtype/device mismatch of ``A`` or
            ``M``; non-finite ``g``.
        TypeError: ``A`` or ``M`` is of an unsupported kind.
    """
    if not isinstance(g, Tensor) or g.ndim != 1 or not g.dtype.is_floating_point:
        got = f"{tuple(g.shape)} {g.dtype}" if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"g must be a real floating tensor of shape (n,), got {got}")
    rtol = _check_tolerance("rtol", rtol)
    atol = _check_tolerance("atol", atol)
    n = g.shape[0]
    maxiter = n if maxiter is None else maxiter
    if isinstance(maxiter, bool) or not isinstance(maxiter, Integral) or maxiter < 1:
        raise ValueError(f"maxiter must be an int >= 1, got {maxiter!r}")
    rad = _radius_tensor(radius, g)
    if check_finite and not bool(torch.isfinite(g).all()):
        raise ValueError("g contains NaN or inf (pass check_finite=False to get a status)")
    matvec = as_matvec(A, g, "A", "g")
    precond = None if M is None else as_matvec(M, g, "M", "g")
    return _gltr(matvec, precond, g, float(rad), rtol, atol, min(int(maxiter), n),
                 explore_invariant)


class _Solution(NamedTuple):
    """The small problem's solution in the current subspace."""

    y: Tensor  # (k,) float64 on the host
    lam: float
    hard: bool
    model: float  # ½yᵀTy + γ₀y₁
    kkt: float  # ‖r_{k+1}‖·|y_k|


class _InteriorPhase:
    """The small problem's interior solution ``y = −γ₀T_k⁻¹e_1`` while ``T_k ≻ 0``, in O(1)
    per Lanczos step: GLTR's first phase, which is CG in the Lanczos basis.

    ``T_k = L D Lᵀ`` (``L`` unit lower bidiagonal) grows by one row per step:
    ``l_{k−1} = β_{k−1}/d_{k−1}``, ``d_k = α_k − β_{k−1} l_{k−1}``; ``T_k ≻ 0`` iff every
    ``d_j > 0``. With ``Lu = −γ₀e_1`` (``u_k = −l_{k−1}u_{k−1}``) and ``w = D⁻¹u``, ``y_k =
    [y_{k−1}; 0] + w_k c_k`` where ``c_k = L_k⁻ᵀe_k = [−l_{k−1}c_{k−1}; 1]``, so ``‖y_k‖²``,
    ``y_k``'s first and last components (``w_k``) update by scalars, as Steihaug's CG updates
    ``‖p‖``. The model value is ``½γ₀y_1`` (``yᵀT y = −γ₀y_1``), the KKT residual
    ``‖r_{k+1}‖·|w_k|``. No ``eigh`` is needed until the step leaves the region or ``T_k``
    stops being positive definite; :func:`_gltr` then switches to the exact small solves.
    """

    def __init__(self, gamma0: float) -> None:
        self.gamma0 = gamma0
        self.w: list[float] = []  # w_j
        self.l: list[float] = []  # l_j, the subdiagonal of L
        self.d = self.u = 0.0
        self.norm2 = self.y_dot_c = self.c_norm2 = self.first = 0.0
        self.c_first = 1.0
        self.rnorm = 0.0  # ‖r_{k+1}‖ of the last step pushed

    def push(self, alpha: float, beta_prev: float) -> bool:
        """Add Lanczos step ``k`` (``α_k`` and the coupling ``β_{k−1}``; ``0`` at ``k = 1``);
        False when ``T_k`` is not positive definite."""
        if not self.w:
            self.u, self.c_norm2, self.c_first, shrink = -self.gamma0, 1.0, 1.0, 0.0
        else:
            shrink = beta_prev / self.d
            self.l.append(shrink)
            alpha -= beta_prev * shrink
            self.u, self.c_first = -shrink * self.u, -shrink * self.c_first
            self.c_norm2 = shrink * shrink * self.c_norm2 + 1.0
        self.d = alpha
        if not (alpha > 0.0):
            return False
        w = self.u / alpha
        self.w.append(w)
        cross = -shrink * self.y_dot_c  # ⟨[y_{k−1}; 0], c_k⟩
        self.norm2 += 2.0 * w * cross + w * w * self.c_norm2
        self.y_dot_c = cross + w * self.c_norm2
        self.first += w * self.c_first
        return True

    def solution(self) -> _Solution:
        """``y`` by back substitution ``y_k = w_k``, ``y_j = w_j − l_j y_{j+1}``."""
        y = [0.0] * len(self.w)
        nxt = 0.0
        for j in range(len(self.w) - 1, -1, -1):
            nxt = self.w[j] - (self.l[j] * nxt if j < len(self.l) else 0.0)
            y[j] = nxt
        return _Solution(torch.tensor(y, dtype=torch.float64), 0.0, False,
                         0.5 * self.gamma0 * self.first, self.rnorm * abs(self.w[-1]))


def _solve_small(T: Tensor, gamma0: float, radius: float, rnorm: float) -> _Solution:
    y, lam, hard = tridiagonal_subproblem(T, gamma0, radius)
    model = gamma0 * float(y[0]) + 0.5 * float(y @ (T @ y))
    return _Solution(y, lam, hard, model, rnorm * abs(float(y[-1])))


def _restart(basis: KrylovBasis, g: Tensor, precond) -> tuple[Tensor, Tensor, float] | None:
    """A fixed pseudo-random start ``M``-orthogonal to the basis: ``(r, M⁻¹r, rᵀM⁻¹r)``, or
    None when nothing is left of it (the basis spans the space up to rounding)."""
    gen = torch.Generator().manual_seed(basis.k)
    x = torch.randn(g.shape[0], generator=gen, dtype=torch.float64).to(g)
    r = basis.project_out(x)
    z = r if precond is None else precond(r)
    rz = float(torch.dot(r, z))
    small = g.shape[0] * torch.finfo(g.dtype).eps * float(torch.linalg.vector_norm(x))
    if not (math.isfinite(rz) and rz > 0) or float(torch.linalg.vector_norm(r)) <= small:
        return None
    return r, z, rz


def _ritz_converged(T_block: Tensor, beta: float, tol: float) -> bool:
    """Whether the lowest Ritz pair of a Lanczos block has residual ``β|s_last| ≤ tol``."""
    _, S = torch.linalg.eigh(T_block)
    return beta * abs(float(S[-1, 0])) <= tol


def _gltr(matvec, precond, g: Tensor, radius: float, rtol: float, atol: float, maxiter: int,
          explore: bool) -> TrustKrylovResult:
    """The Lanczos loop of the module docstring; Python floats for the coefficients."""
    S = TrustKrylovStatus
    n, eps = g.shape[0], torch.finfo(g.dtype).eps
    r = g
    z = r if precond is None else precond(r)
    rz, gnorm = float(torch.dot(r, z)), float(torch.linalg.vector_norm(g))
    tol = max(rtol * gnorm, atol)
    basis = KrylovBasis(g, maxiter, precond is not None)
    sol = _Solution(torch.zeros(0, dtype=torch.float64), 0.0, False, 0.0, gnorm)
    if not (math.isfinite(rz) and math.isfinite(gnorm)):
        return _result(g, basis, sol, radius, tol, 0, maxiter, S.NON_FINITE)
    if gnorm <= tol or gnorm == 0.0:
        return _result(g, basis, sol, radius, tol, 0, maxiter, S.CONVERGED)
    if rz <= 0:
        return _result(g, basis, sol, radius, tol, 0, maxiter, S.INDEFINITE_PRECONDITIONER)
    gamma0 = gamma = math.sqrt(rz)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples steps j and j+1; 0 where Lanczos restarted
    v_prev, scale, block, explored = None, 0.0, 0, False
    status, k = S.MAX_ITERATIONS, 0
    interior: _InteriorPhase | None = _InteriorPhase(gamma0)
    while k < maxiter:
        k += 1
        q = z / gamma
        v = q if precond is None else r / gamma  # v = Mq
        basis.append(q, v)
        w = matvec(q)
        alpha = float(torch.dot(q, w))
        r = torch.add(w, v, alpha=-alpha)
        if v_prev is not None:
            r = r.add_(v_prev, alpha=-gamma)
        r = basis.project_out(r)
        z = r if precond is None else precond(r)
        rz = float(torch.dot(r, z))
        rnorm = math.sqrt(max(rz, 0.0)) if precond is None else float(torch.linalg.vector_norm(r))
        if not (math.isfinite(alpha) and math.isfinite(rz) and math.isfinite(rnorm)):
            status = S.NON_FINITE
            break
        alphas.append(alpha)
        scale = max(scale, abs(alpha))
        beta = math.sqrt(abs(rz))
        invariant = k == n or beta <= n * eps * scale
        if not invariant and rz < 0:
            status = S.INDEFINITE_PRECONDITIONER
            break
        scale = max(scale, beta)
        if interior is not None:
            if not invariant and interior.push(alpha, betas[-1] if betas else 0.0) and (
                    interior.norm2 < radius * radius):
                sol, interior.rnorm = None, rnorm  # CG's iterate: built only when needed
                if rnorm * abs(interior.w[-1]) <= tol:
                    break
                betas.append(beta)
                v_prev, gamma = v, beta
                continue
            interior = None  # left the region or T_k ⊁ 0: exact small solves from now on
        T = _tridiagonal(alphas, betas)
        sol = _solve_small(T, gamma0, radius, 0.0 if invariant else rnorm)
        if invariant:
            fresh = None if (not explore or explored or k >= maxiter) else _restart(basis, g,
                                                                                      precond)
            if fresh is None:
                status = _done(sol)
                break
            (r, z, rz), explored, block, v_prev = fresh, True, k, None
            gamma = math.sqrt(rz)
            betas.append(0.0)
            continue
        if sol.kkt <= tol and (not explored or _ritz_converged(
                T[block:, block:], beta, max(rtol, math.sqrt(eps)) * scale)):
            status = _done(sol)
            break
        betas.append(beta)
        v_prev, gamma = v, beta
    if sol is None:  # stopped in the interior phase
        sol = interior.solution()
        if status is S.MAX_ITERATIONS and sol.kkt <= tol:
            status = S.CONVERGED
    return _result(g, basis, sol, radius, tol, k, maxiter, status)


def _done(sol: _Solution) -> TrustKrylovStatus:
    S = TrustKrylovStatus
    return S.HARD_CASE if sol.hard else S.BOUNDARY if sol.lam > 0 else S.CONVERGED


def _result(g: Tensor, basis: KrylovBasis, sol: _Solution, radius: float, tol: float, k: int,
            maxiter: int, status: TrustKrylovStatus) -> TrustKrylovResult:
    """Package the state: ``p = Q y`` on ``g``'s device and dtype, scalars as 0-d tensors."""

    def scalar(x: float, dtype: torch.dtype = g.dtype) -> Tensor:
        return torch.tensor(x, dtype=dtype, device=g.device)

    p = basis.combine(sol.y) if sol.y.numel() else torch.zeros_like(g)
    return TrustKrylovResult(
        p=p,
        model_value=scalar(sol.model),
        p_norm=scalar(float(torch.linalg.vector_norm(sol.y))),
        on_boundary=scalar(sol.lam > 0, torch.bool),
        iterations=scalar(k, torch.int64),
        multiplier=scalar(sol.lam),
        kkt_residual=scalar(sol.kkt),
        radius=scalar(radius),
        tolerance=scalar(tol),
        matvecs=k,
        maxiter=maxiter,
        status_code=scalar(TrustKrylovStatus.code(status), torch.int8),
    )
