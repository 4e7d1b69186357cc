"""Conjugate gradients for ``(A + λI) x = b`` with a matrix-free ``A``.

The iteration is the one of the seed notes (TRPO notes, "共轭法求解过程"), with
an optional preconditioner ``M`` (a callable applying ``M⁻¹``)::

    x₀ = x0 or 0,   r₀ = b − (A + λI) x₀,   z₀ = M⁻¹ r₀,   p₀ = z₀
    repeat:
        q  = (A + λI) p                          one operator application
        α  = rᵀz / pᵀq                           (rᵀr / pᵀAp without M)
        x ← x + α p,   r ← r − α q
        stop if ‖r‖ ≤ max(rtol·‖b‖, atol)
        z' = M⁻¹ r,   β = r'ᵀz' / rᵀz            (r'ᵀr' / rᵀr without M)
        p ← z' + β p

``b`` may be one right-hand side ``(n,)`` or a block ``(n, k)`` of ``k``
independent systems that share the operator: every scalar above (α, β, ‖r‖, the
stopping test, the status) is then per column, and a column that has stopped is
frozen with :func:`torch.where` while the others go on.

Two modes:

* **tolerance mode** (``rtol > 0`` or ``atol > 0``, the default): like scipy, the
  loop asks the host once per iteration whether any column is still running and
  stops as soon as none is.
* **fixed-iteration mode** (``rtol == atol == 0``): exactly ``maxiter`` operator
  applications (plus one for ``x0``), and the loop never synchronises with the
  host: no ``.item()``, no ``bool(tensor)``, no Python branch on a tensor value.
  Breakdowns (an exactly zero residual, ``pᵀAp ≤ 0``, NaN/inf) are detected
  with tensor flags and the affected columns frozen with ``torch.where``, so a
  column whose residual reaches 0 never divides 0 by 0. On a GPU the whole
  solve is queued asynchronously, the way TRPO's "10 CG iterations" are meant
  to run. :class:`CGResult` holds tensors and decodes the statuses only when
  :attr:`CGResult.status` / :attr:`CGResult.statuses` is read (that read syncs).

Example:
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> res = cg_solve(A, b)
    >>> res.status, int(res.iterations)
    (<CGStatus.CONVERGED: 'converged'>, 2)
    >>> torch.allclose(res.x, torch.linalg.solve(A, b))
    True
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor

__all__ = ["CGError", "CGIterate", "CGResult", "CGStatus", "cg_solve"]

Matvec = Callable[[Tensor], Tensor]


class CGStatus(str, enum.Enum):
    """Why :func:`cg_solve` stopped (per column of the right-hand side)."""

    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    NON_POSITIVE_CURVATURE = "non_positive_curvature"
    INDEFINITE_PRECONDITIONER = "indefinite_preconditioner"
    NON_FINITE = "non_finite"

    @property
    def message(self) -> str:
        """What the status means and what to try."""
        return _MESSAGES[self]


_MESSAGES = {
    CGStatus.CONVERGED: "converged: ‖r‖ ≤ max(rtol·‖b‖, atol)",
    CGStatus.MAX_ITERATIONS: (
        "reached maxiter before ‖r‖ ≤ max(rtol·‖b‖, atol); increase maxiter, loosen "
        "rtol/atol, add damping or a preconditioner M (fine when a fixed number of "
        "iterations is intended: use raise_if_failed(allow_max_iterations=True))"
    ),
    CGStatus.NON_POSITIVE_CURVATURE: (
        "non-positive curvature pᵀ(A + damping·I)p ≤ 0: the operator is not positive "
        "definite along result.direction; add damping (e.g. damping=1e-3 relative to the "
        "operator's scale) or check the curvature (the Hessian of a non-convex loss is "
        "indefinite: a Gauss-Newton or Fisher operator is positive semi-definite)"
    ),
    CGStatus.INDEFINITE_PRECONDITIONER: (
        "rᵀM⁻¹r ≤ 0 with r ≠ 0: the preconditioner M is not positive definite; M must "
        "apply the inverse of a symmetric positive definite matrix (e.g. r / d with a "
        "positive diagonal d)"
    ),
    CGStatus.NON_FINITE: (
        "a NaN or inf appeared in the operator output, the preconditioner output or the "
        "iterates; check that A @ v is finite for finite v, the inputs b and x0, and the "
        "dtype (float32 overflow?)"
    ),
}

# Codes of the per-column status tensor, ordered by severity so that the overall
# status of a block is the maximum code. Only this module sees the numbers.
_ORDER = (
    CGStatus.CONVERGED,
    CGStatus.MAX_ITERATIONS,
    CGStatus.NON_POSITIVE_CURVATURE,
    CGStatus.INDEFINITE_PRECONDITIONER,
    CGStatus.NON_FINITE,
)
_CODE = {s: i for i, s in enumerate(_ORDER)}


class CGError(RuntimeError):
    """Raised by :meth:`CGResult.raise_if_failed`; ``.result`` holds the result."""

    def __init__(self, message: str, result: CGResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class CGIterate:
    """What the ``callback`` of :func:`cg_solve` receives after each iteration.

    All tensors are the solver's own (do not modify them in place; clone to keep).
    Scalars are ``()`` for ``b`` of shape ``(n,)`` and ``(k,)`` for ``(n, k)``.

    Attributes:
        iteration: 1-based index of the loop iteration just done (a Python int).
        x: The iterate ``x_{i}`` after this iteration, shape of ``b``.
        residual: The recursively updated residual ``r_{i} = r_{i-1} − α q``.
        direction: The search direction ``p_{i-1}`` used in this iteration.
        alpha: The step ``α`` taken (0 for frozen columns).
        residual_norm: ``‖r_{i}‖`` per column.
        active: Whether the column is still iterating after this iteration.
    """

    iteration: int
    x: Tensor
    residual: Tensor
    direction: Tensor
    alpha: Tensor
    residual_norm: Tensor
    active: Tensor


@dataclass(frozen=True)
class CGResult:
    """Result of :func:`cg_solve`.

    Shapes: for ``b`` of shape ``(n,)`` the per-column fields are 0-d tensors, for
    ``(n, k)`` they have shape ``(k,)``. All tensor fields live on ``b``'s device,
    so building the result never synchronises with the host; :attr:`status`,
    :attr:`statuses`, :attr:`message` and :meth:`raise_if_failed` do.

    Attributes:
        x: The solution, shape of ``b``. After a breakdown, the last finite iterate.
        iterations: Completed updates of ``x`` per column (int64). A breakdown
            iteration (``pᵀAp ≤ 0`` or non-finite) costs a matvec but is not counted.
        residual_norm: ``‖r‖`` of the recursively updated residual per column (the
            true ``‖b − (A + λI)x‖`` differs from it by rounding only).
        converged: ``‖r‖ ≤ max(rtol·‖b‖, atol)`` per column (bool tensor).
        direction: For columns with ``NON_POSITIVE_CURVATURE``, the offending search
            direction ``p`` (``pᵀ(A + λI)p ≤ 0``); zeros in the other columns.
        curvature: ``pᵀ(A + λI)p`` of ``direction`` per column (0 elsewhere).
        tolerance: The stopping threshold ``max(rtol·‖b‖, atol)`` per column.
        matvecs: Operator applications done (Python int): one per loop iteration,
            plus one for the initial residual when ``x0`` is given.
        maxiter: The iteration limit used.
        status_code: Internal per-column status codes; read :attr:`statuses` or use
            :meth:`status_mask` instead.
        residual: The recursively updated residual ``r = b − (A + λI)x`` of the returned
            ``x`` (shape of ``b``); e.g. ``xᵀ(A + λI)x = xᵀ(b − r)`` without another
            operator application.
    """

    x: Tensor
    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    direction: Tensor
    curvature: Tensor
    tolerance: Tensor
    matvecs: int
    maxiter: int
    status_code: Tensor
    residual: Tensor | None = None

    @property
    def statuses(self) -> tuple[CGStatus, ...]:
        """Per-column statuses, a tuple of length 1 for ``(n,)`` and ``k`` for ``(n, k)``."""
        return tuple(_ORDER[c] for c in self.status_code.reshape(-1).tolist())

    @property
    def status(self) -> CGStatus:
        """The status; for a block, the most severe column's (``NON_FINITE`` first)."""
        codes = self.status_code.reshape(-1)
        if codes.numel() == 0:
            return CGStatus.CONVERGED
        return _ORDER[int(codes.max())]

    def status_mask(self, *statuses: CGStatus) -> Tensor:
        """Bool tensor (per column) of where the status is one of ``statuses``; no sync."""
        mask = torch.zeros_like(self.status_code, dtype=torch.bool)
        for s in statuses:
            mask = mask | (self.status_code == _CODE[CGStatus(s)])
        return mask

    @property
    def message(self) -> str:
        """A sentence for the most severe column: what happened and what to try."""
        codes = self.status_code.reshape(-1)
        if codes.numel() == 0:
            return _MESSAGES[CGStatus.CONVERGED]
        j = int(codes.argmax())
        status = _ORDER[int(codes[j])]
        it = int(self.iterations.reshape(-1)[j])
        rnorm = float(self.residual_norm.reshape(-1)[j])
        tol = float(self.tolerance.reshape(-1)[j])
        where = f" in column {j}" if self.status_code.ndim else ""
        if status is CGStatus.CONVERGED:
            head = f"CG converged{where} after {_iters(it)}: ‖r‖ = {rnorm:.3g} ≤ {tol:.3g}"
            return head
        if status is CGStatus.MAX_ITERATIONS:
            head = (
                f"CG did not converge{where} in maxiter={self.maxiter} iterations: "
                f"‖r‖ = {rnorm:.3g} > tolerance {tol:.3g}"
            )
        elif status is CGStatus.NON_POSITIVE_CURVATURE:
            curv = float(self.curvature.reshape(-1)[j])
            head = f"CG hit non-positive curvature pᵀAp = {curv:.3g}{where} after {_iters(it)}"
        elif status is CGStatus.INDEFINITE_PRECONDITIONER:
            head = f"CG preconditioner breakdown{where} after {_iters(it)}"
        else:
            head = f"CG produced a non-finite value{where} after {_iters(it)}"
        return f"{head}: {status.message}"

    def raise_if_failed(self, *, allow_max_iterations: bool = False) -> CGResult:
        """Raise :class:`CGError` unless every column converged; return ``self``.

        Args:
            allow_max_iterations: Also accept ``MAX_ITERATIONS`` (truncated CG with a
                fixed number of iterations, as in TRPO); breakdowns still raise.
        """
        ok = {CGStatus.CONVERGED}
        if allow_max_iterations:
            ok.add(CGStatus.MAX_ITERATIONS)
        if self.status not in ok:
            raise CGError(self.message, self)
        return self


def _iters(k: int) -> str:
    return f"{k} iteration" if k == 1 else f"{k} iterations"


# --------------------------------------------------------------------- coercion
def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when one index is unspecified.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_output(name: str, fn: Matvec) -> Matvec:
    """Wrap ``fn`` so that a wrongly shaped/typed output is a ValueError (metadata only)."""

    def checked(v: Tensor) -> Tensor:
        out = fn(v)
        if not isinstance(out, Tensor):
            raise ValueError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != v.shape or out.dtype != v.dtype or not _same_device(out.device, v.device):
            raise ValueError(
                f"{name} maps a {tuple(v.shape)} {v.dtype} tensor on {v.device} to "
                f"{tuple(out.shape)} {out.dtype} on {out.device}; it must preserve shape, dtype "
                f"and device (for a block b of shape (n, k) it must accept (n, k): wrap a "
                f"vector-only function in natgrad.linop.LinearOperator)"
            )
        return out

    return checked


def _as_matvec(A: Any, b: Tensor, name: str = "A") -> Matvec:
    """Coerce ``A`` into a function ``v -> A v`` on tensors shaped like ``b``.

    Accepts a dense square ``torch.Tensor``; a numpy array, scipy sparse matrix or
    ``scipy.sparse.linalg.LinearOperator`` (applied in numpy, converted back: this
    path syncs and is meant for tests and small problems); an object with
    ``.matvec`` and ``.shape`` (:class:`natgrad.linop.LinearOperator`, whose
    ``dtype`` and ``device`` are checked when present); or any callable ``v -> A v``.

    Raises:
        ValueError: Shape, dtype or device mismatch with ``b`` (naming ``name``).
        TypeError: ``A`` is none of the above.
    """
    n = b.shape[0]

    def check_shape(shape: tuple[int, ...]) -> None:
        if tuple(shape) != (n, n):
            raise ValueError(f"{name} has shape {tuple(shape)}, expected ({n}, {n}) to match b")

    if isinstance(A, Tensor):
        check_shape(A.shape)
        if A.dtype != b.dtype:
            raise ValueError(f"{name} has dtype {A.dtype} but b has dtype {b.dtype}")
        if not _same_device(A.device, b.device):
            raise ValueError(f"{name} is on {A.device} but b is on {b.device}")
        return lambda v: A @ v
    if isinstance(A, np.ndarray | scipy.sparse.linalg.LinearOperator) or scipy.sparse.issparse(A):
        check_shape(A.shape)
        mat = np.asarray(A) if isinstance(A, np.ndarray) else A

        def numpy_matvec(v: Tensor) -> Tensor:
            out = np.asarray(mat @ v.detach().cpu().numpy())
            return torch.as_tensor(out, device=v.device).to(v.dtype).reshape(v.shape)

        return numpy_matvec
    if hasattr(A, "matvec") and hasattr(A, "shape"):
        check_shape(A.shape)
        dtype = getattr(A, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype != b.dtype:
            raise ValueError(f"{name} has dtype {dtype} but b has dtype {b.dtype}")
        device = getattr(A, "device", None)
        if device is not None and not _same_device(torch.device(device), b.device):
            raise ValueError(f"{name} is on {device} but b is on {b.device}")
        return _check_output(name, A.matvec)
    if callable(A):
        return _check_output(name, A)
    raise TypeError(
        f"{name} must be a torch.Tensor, a LinearOperator, a scipy operator/matrix or a "
        f"callable v -> {name} v, got {type(A).__name__}"
    )


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0.0 or value == float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


# ------------------------------------------------------------------------ solver
def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-column inner products: ``()`` for ``(n,)``, ``(k,)`` for ``(n, k)``."""
    return (u * v).sum(dim=0)


def _colnorm(u: Tensor) -> Tensor:
    return torch.linalg.vector_norm(u, dim=0)


def _allfinite(u: Tensor) -> Tensor:
    return torch.isfinite(u).all(dim=0)


def cg_solve(
    A: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    damping: float = 0.0,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    callback: Callable[[CGIterate], None] | None = None,
    check_finite: bool = True,
) -> CGResult:
    """Solve ``(A + damping·I) x = b`` by (preconditioned) conjugate gradients.

    CG as in the seed notes: ``α = rᵀr / pᵀAp``, ``x ← x + αp``, ``r ← r − αAp``,
    ``β = r'ᵀr' / rᵀr``, ``p ← r' + βp``; with ``M``: ``z = M⁻¹r``,
    ``α = rᵀz / pᵀAp``, ``β = r'ᵀz' / rᵀz``, ``p ← z' + βp``. ``A + damping·I``
    must be symmetric positive definite (and ``M`` too).

    Stopping rule, per column: ``‖r‖ ≤ max(rtol·‖b‖, atol)`` where ``r`` is the
    recursively updated residual (checked before the first iteration and after
    each update), or ``maxiter`` iterations. With ``rtol == atol == 0`` the solver
    runs exactly ``maxiter`` iterations without host synchronisation (a column
    whose residual becomes exactly 0 is frozen and reported ``CONVERGED``).

    Breakdowns stop the column and keep its last iterate: ``pᵀ(A + λI)p ≤ 0``
    (``NON_POSITIVE_CURVATURE``, offending ``p`` in ``result.direction``; never
    divided by), ``rᵀM⁻¹r ≤ 0`` (``INDEFINITE_PRECONDITIONER``), NaN/inf from the
    operator or preconditioner (``NON_FINITE``). ``b = 0`` gives ``x = 0``,
    ``CONVERGED``, 0 iterations.

    Cost: ``result.matvecs`` operator applications = (1 if ``x0`` is given) + the
    number of loop iterations, which is ``maxiter`` in fixed-iteration mode and, in
    tolerance mode, the largest per-column iteration count (+1 when the last
    running column stopped on ``pᵀAp ≤ 0`` or a non-finite operator output, whose
    matvec is spent without an update). ``M`` is applied once for ``r₀`` and once
    per loop iteration.

    Args:
        A: The operator: a :class:`natgrad.linop.LinearOperator` (or any object with
            ``.matvec`` and ``.shape``), a dense ``(n, n)`` tensor, a numpy/scipy
            matrix or ``scipy.sparse.linalg.LinearOperator`` (applied via numpy, not
            for GPU use), or a callable ``v -> A v`` that accepts the shape of ``b``.
        b: Right-hand side, ``(n,)`` or a block ``(n, k)`` of ``k`` systems, real
            floating dtype.
        x0: Initial guess, shape/dtype/device of ``b``; default 0. Never modified.
        damping: ``λ ≥ 0`` added to the diagonal: solves ``(A + λI) x = b``.
        rtol: Relative tolerance (default 1e-5, as scipy).
        atol: Absolute tolerance (default 0).
        maxiter: Iteration limit, ``≥ 1``; default ``10·n`` (as scipy).
        M: Preconditioner applying ``M⁻¹`` (same kinds as ``A``, e.g. the Jacobi
            ``lambda r: r / d`` for a ``(n,)`` diagonal ``d``, ``d[:, None]`` for blocks).
        callback: Called after each loop iteration with a :class:`CGIterate`
            (``x``, residual, direction, α, ‖r‖, active mask). It may read tensors
            (which syncs); in fixed-iteration mode leave it ``None`` to stay async.
        check_finite: Raise ``ValueError`` at once if ``b`` or ``x0`` holds NaN/inf
            (one host sync before the loop). With ``False`` such columns get the
            ``NON_FINITE`` status instead, and the call is free of host syncs in
            fixed-iteration mode. NaN/inf from the operator always gives a status.

    Returns:
        A :class:`CGResult`; per-column fields have shape ``()`` for ``b`` of shape
        ``(n,)`` and ``(k,)`` for ``(n, k)``.

    Raises:
        ValueError: ``b`` is not 1-D/2-D floating; shape, dtype or device mismatch of
            ``A``, ``x0`` or ``M`` with ``b``; negative ``damping``/``rtol``/``atol``;
            ``maxiter < 1``; non-finite ``b``/``x0`` with ``check_finite``.
        TypeError: ``A`` or ``M`` is of an unsupported kind.
    """
    # ---- validate (metadata and Python numbers only: no sync)
    if not isinstance(b, Tensor):
        raise ValueError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.ndim not in (1, 2) or not b.dtype.is_floating_point:
        raise ValueError(
            f"b must be a real floating tensor of shape (n,) or (n, k), got "
            f"{tuple(b.shape)} {b.dtype}"
        )
    n = b.shape[0]
    damping = _check_nonneg("damping", damping)
    rtol = _check_nonneg("rtol", rtol)
    atol = _check_nonneg("atol", atol)
    if maxiter is None:
        maxiter = max(10 * n, 1)
    if isinstance(maxiter, bool) or int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"maxiter must be an int >= 1, got {maxiter!r}")
    maxiter = int(maxiter)
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise ValueError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if x0.shape != b.shape or x0.dtype != b.dtype or not _same_device(x0.device, b.device):
            raise ValueError(
                f"x0 must match b ({tuple(b.shape)} {b.dtype} on {b.device}), got "
                f"{tuple(x0.shape)} {x0.dtype} on {x0.device}"
            )
    if check_finite:
        if not bool(torch.isfinite(b).all()):
            raise ValueError("b contains NaN or inf (pass check_finite=False to get a status)")
        if x0 is not None and not bool(torch.isfinite(x0).all()):
            raise ValueError("x0 contains NaN or inf (pass check_finite=False to get a status)")

    matvec = _as_matvec(A, b, "A")
    precond = None if M is None else _as_matvec(M, b, "M")
    if damping > 0.0:
        undamped = matvec

        def matvec(v: Tensor) -> Tensor:
            return undamped(v) + damping * v

    fixed = rtol == 0.0 and atol == 0.0
    conv = _CODE[CGStatus.CONVERGED]
    npc = _CODE[CGStatus.NON_POSITIVE_CURVATURE]
    bad_m = _CODE[CGStatus.INDEFINITE_PRECONDITIONER]
    nonfinite = _CODE[CGStatus.NON_FINITE]

    # ---- initial state
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()  # never mutate the caller's x0
        r = b - matvec(x)
        matvecs += 1
    tol = torch.clamp(rtol * _colnorm(b), min=atol)
    rnorm = _colnorm(r)
    z = r if precond is None else precond(r)
    rz = _dot(r, z)
    finite = _allfinite(b) & _allfinite(x) & torch.isfinite(rnorm) & torch.isfinite(rz)
    done = finite & (rnorm <= tol)
    indefinite = finite & ~done & (rz <= 0)
    # Without M, rᵀr == 0 with ‖r‖ > tol can only be underflow: treat as converged.
    code = torch.full(
        rnorm.shape, _CODE[CGStatus.MAX_ITERATIONS], dtype=torch.int8, device=b.device
    )
    code = torch.where(~finite, nonfinite, code)
    code = torch.where(done, conv, code)
    code = torch.where(indefinite, conv if precond is None else bad_m, code)
    active = finite & ~done & ~indefinite
    p = z.clone() if precond is not None else r.clone()
    iterations = torch.zeros(rnorm.shape, dtype=torch.int64, device=b.device)
    direction = torch.zeros_like(b)
    curvature = torch.zeros_like(rnorm)

    # ---- iterate
    for i in range(maxiter):
        if not fixed and not bool(active.any()):  # tolerance mode: one host check per iteration
            break
        p_used = p
        # Frozen columns apply the operator to 0, so their stale p cannot leak NaN.
        q = matvec(torch.where(active, p, 0.0))
        matvecs += 1
        pq = _dot(p, q)
        q_ok = _allfinite(q) & torch.isfinite(pq)
        broke_nonfinite = active & ~q_ok
        broke_npc = active & q_ok & (pq <= 0)
        step = active & q_ok & (pq > 0)
        # Divide only where the denominator is known positive (no 0/0, no x/neg).
        alpha = torch.where(step, rz / torch.where(step, pq, 1.0), 0.0)
        x_new = x + alpha * p
        r_new = r - alpha * q
        rnorm_new = _colnorm(r_new)
        upd_ok = torch.isfinite(alpha) & _allfinite(x_new) & torch.isfinite(rnorm_new)
        broke_nonfinite = broke_nonfinite | (step & ~upd_ok)
        step = step & upd_ok
        x = torch.where(step, x_new, x)
        r = torch.where(step, r_new, r)
        rnorm = torch.where(step, rnorm_new, rnorm)
        iterations = iterations + step.to(torch.int64)
        converged_now = step & (rnorm <= tol)

        z = r if precond is None else precond(r)
        rz_new = _dot(r, z)
        cont = step & ~converged_now
        z_ok = torch.isfinite(rz_new) & (_allfinite(z) if precond is not None else True)
        broke_nonfinite = broke_nonfinite | (cont & ~z_ok)
        broke_rz = cont & z_ok & (rz_new <= 0)
        cont = cont & z_ok & (rz_new > 0)
        beta = torch.where(cont, rz_new / torch.where(cont, rz, 1.0), 0.0)
        p_new = z + beta * p
        p = torch.where(cont, p_new, p)
        rz = torch.where(cont, rz_new, rz)

        direction = torch.where(broke_npc, p, direction)
        curvature = torch.where(broke_npc, pq, curvature)
        code = torch.where(converged_now, conv, code)
        code = torch.where(broke_npc, npc, code)
        code = torch.where(broke_rz, conv if precond is None else bad_m, code)
        code = torch.where(broke_nonfinite, nonfinite, code)
        active = cont
        if callback is not None:
            callback(
                CGIterate(
                    iteration=i + 1,
                    x=x,
                    residual=r,
                    direction=p_used,
                    alpha=alpha,
                    residual_norm=rnorm,
                    active=active,
                )
            )

    return CGResult(
        x=x,
        iterations=iterations,
        residual_norm=rnorm,
        converged=code == conv,
        direction=direction,
        curvature=curvature,
        tolerance=tol,
        matvecs=matvecs,
        maxiter=maxiter,
        status_code=code,
        residual=r,
    )
