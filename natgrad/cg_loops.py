"""The two CG loops behind :class:`natgrad.cg.CG`: a scalar one and a column-masked one.

* :func:`vector_cg`: one right-hand side ``(n,)`` in tolerance mode. The scalars ``α``,
  ``β``, ``rᴴz``, ``‖r‖`` are Python floats read from the device (two reads per
  iteration); the vectors are updated by fused ``torch.add(.., alpha=...)``. Five small
  kernels per iteration besides the operator: what scipy's ``cg`` does with numpy.
* :func:`block_cg`: ``(n,)`` or ``(n, k)``; every scalar is a per-column tensor, stopped
  columns are frozen with ``torch.where``. With ``fixed=True`` it never reads a device value
  (no host sync); otherwise it asks once per iteration whether a column still runs.
* :func:`fixed_vector_cg`: :func:`block_cg`'s fixed-iteration loop for one CPU vector, where
  a host read is free: the same tensor operations in the same order (so the same bits), the
  masks replaced by Python checks. ~40 instead of ~225 µs per iteration besides the operator
  (n = 5,126, float32, one thread: ``python bench/cg_overhead.py --fixed``). It gives up
  (``None``) at the first iteration that is not an ordinary step; :meth:`natgrad.cg.CG.solve`
  then runs :func:`block_cg` from the start.

Both stop a column when ``‖r‖ ≤ stop = max(tol, ε·‖b‖)`` (``ε`` the dtype's machine
epsilon: below it the recursive residual is rounding noise) and treat ``pᴴAp = 0`` with
``rᴴz`` below the dtype's smallest normal number as convergence (the direction
underflowed), not as a curvature breakdown. The status codes are the indices of
:class:`natgrad.cg.CGStatus`'s members, in :data:`CODE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CODE", "CGIterate", "Run", "block_cg", "fixed_vector_cg", "vector_cg"]

Matvec = Callable[[Tensor], Tensor]

# Severity order of natgrad.cg.CGStatus (checked there by an assert).
CODE = {
    name: i
    for i, name in enumerate(
        (
            "CONVERGED",
            "MAX_ITERATIONS",
            "INACCURATE",
            "NON_POSITIVE_CURVATURE",
            "INDEFINITE_PRECONDITIONER",
            "NON_FINITE",
        )
    )
}


@dataclass(frozen=True)
class CGIterate:
    """What the ``callback`` of :func:`natgrad.cg.cg_solve` receives after each iteration.

    All tensors are the solver's own (do not modify them in place; clone to keep).
    Scalars are ``()`` for ``b`` of shape ``(n,)`` and ``(k,)`` for ``(n, k)``.

    Attributes:
        iteration: 1-based index of the loop iteration just done (a Python int; it goes
            on counting across a true-residual restart).
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


@dataclass
class Run:
    """The state a loop hands back (mutable: the true-residual check updates it)."""

    x: Tensor
    r: Tensor
    rnorm: Tensor
    code: Tensor
    iterations: Tensor
    direction: Tensor
    curvature: Tensor
    matvecs: int
    checked: Tensor


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-column ``Re(uᴴv)``: ``()`` for ``(n,)``, ``(k,)`` for ``(n, k)``."""
    d = torch.linalg.vecdot(u, v, dim=0)
    return d.real if d.is_complex() else d


def _allfinite(u: Tensor) -> Tensor:
    return torch.isfinite(u).all(dim=0)


def _run(
    b: Tensor,
    x: Tensor,
    r: Tensor,
    rnorm: float,
    code: str,
    it: int,
    mv: int,
    direction: Tensor | None = None,
    curvature: float = 0.0,
) -> Run:
    """A :class:`Run` of a single vector from Python scalars (built once, at the end)."""
    real = _real_dtype(b)

    def scalar(v: float, dtype: torch.dtype) -> Tensor:
        return torch.tensor(v, dtype=dtype, device=b.device)

    return Run(
        x=x,
        r=r,
        rnorm=scalar(rnorm, real),
        code=scalar(CODE[code], torch.int8),
        iterations=scalar(it, torch.int64),
        direction=torch.zeros_like(b) if direction is None else direction,
        curvature=scalar(curvature, real),
        matvecs=mv,
        checked=scalar(False, torch.bool),
    )


def _real_dtype(b: Tensor) -> torch.dtype:
    """The real dtype of norms and curvatures of ``b``'s dtype."""
    return b.real.dtype if b.is_complex() else b.dtype


def vector_cg(
    matvec: Matvec,
    precond: Matvec | None,
    b: Tensor,
    x0: Tensor | None,
    bnorm: float,
    tol: float,
    maxiter: int,
    callback: Callable[[CGIterate], None] | None,
    *,
    r0: Tensor | None = None,
    offset: int = 0,
) -> Run:
    """Tolerance-mode CG of one vector ``b`` ``(n,)`` with Python-float scalars.

    Stops when ``‖r‖ ≤ max(tol, ε·‖b‖)``, on a breakdown, or after ``maxiter`` iterations.
    ``r0`` is ``b − (A + λI)x0`` when the caller already has it (a restart).
    """
    finfo = torch.finfo(b.dtype)
    stop = max(tol, finfo.eps * bnorm)
    dot = torch.vdot if b.is_complex() else torch.dot  # vdot conjugates its first argument

    def norm(v: Tensor) -> float:
        # ‖v‖ from one dot product (cheaper than vector_norm), unless v·v under/overflows.
        vv = dot(v, v).real.item()
        return math.sqrt(vv) if finfo.tiny < vv < finfo.max else torch.linalg.norm(v).item()

    if bnorm == 0.0:  # scipy: b = 0 gives x = 0 at once, whatever x0
        return _run(b, torch.zeros_like(b), torch.zeros_like(b), 0.0, "CONVERGED", 0, 0)
    mv = 0
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x, r = x0.clone(), r0
        if r is None:
            r, mv = b - matvec(x), 1
    rnorm = norm(r)
    if not (math.isfinite(rnorm) and math.isfinite(bnorm)):
        return _run(b, x, r, rnorm, "NON_FINITE", 0, mv)
    if rnorm <= stop:
        return _run(b, x, r, rnorm, "CONVERGED", 0, mv)
    z = r if precond is None else precond(r)
    rz = rnorm * rnorm if precond is None else dot(r, z).real.item()
    if not math.isfinite(rz):
        return _run(b, x, r, rnorm, "NON_FINITE", 0, mv)
    if rz <= 0.0:
        return _run(b, x, r, rnorm, "INDEFINITE_PRECONDITIONER", 0, mv)
    p = z.clone() if z is r else z
    for i in range(maxiter):
        q = matvec(p)
        mv += 1
        pq = dot(p, q).real.item()
        if not math.isfinite(pq):
            return _run(b, x, r, rnorm, "NON_FINITE", i, mv)
        if pq <= 0.0:
            if pq == 0.0 and rz < finfo.tiny:  # the direction underflowed: nothing left
                return _run(b, x, r, rnorm, "CONVERGED", i, mv)
            return _run(b, x, r, rnorm, "NON_POSITIVE_CURVATURE", i, mv, p, pq)
        alpha = rz / pq
        r_new = torch.add(r, q, alpha=-alpha)
        rnorm_new = norm(r_new)
        if not (math.isfinite(alpha) and math.isfinite(rnorm_new)):
            return _run(b, x, r, rnorm, "NON_FINITE", i, mv)
        x.add_(p, alpha=alpha)  # x is our own copy; r stays out of place until checked
        r, rnorm = r_new, rnorm_new
        status = None
        if rnorm <= stop:
            status = "CONVERGED"
        else:
            z = r if precond is None else precond(r)
            rz_new = rnorm * rnorm if precond is None else dot(r, z).real.item()
            if not math.isfinite(rz_new):
                status = "NON_FINITE"
            elif rz_new <= 0.0:  # without M only by underflow of ‖r‖²: converged
                status = "CONVERGED" if precond is None else "INDEFINITE_PRECONDITIONER"
        if callback is not None:
            callback(_vector_iterate(offset + i + 1, x, r, p, alpha, rnorm, status is None))
        if status is not None:
            return _run(b, x, r, rnorm, status, i + 1, mv)
        p = torch.add(z, p, alpha=rz_new / rz)
        rz = rz_new
    return _run(b, x, r, rnorm, "MAX_ITERATIONS", maxiter, mv)


def _vector_iterate(
    i: int, x: Tensor, r: Tensor, p: Tensor, alpha: float, rnorm: float, active: bool
) -> CGIterate:
    real = _real_dtype(x)
    return CGIterate(
        iteration=i,
        x=x,
        residual=r,
        direction=p,
        alpha=torch.tensor(alpha, dtype=real, device=x.device),
        residual_norm=torch.tensor(rnorm, dtype=real, device=x.device),
        active=torch.tensor(active, device=x.device),
    )


def _initial(
    matvec: Matvec, b: Tensor, x0: Tensor | None, r0: Tensor | None, zero_b: Tensor, fixed: bool
) -> tuple[Tensor, Tensor, int]:
    """``x₀`` and ``r₀ = b − (A + λI)x₀``, with ``x = r = 0`` in the columns where ``b = 0``."""
    if x0 is None:
        return torch.zeros_like(b), b.clone(), 0
    if not fixed and r0 is None and bool(zero_b.all()):  # b = 0: no operator application
        return torch.zeros_like(b), torch.zeros_like(b), 0
    mv = 0
    if r0 is None:
        r0, mv = b - matvec(x0), 1
    x = torch.where(zero_b, 0.0, x0)  # also a copy: the caller's x0 is never touched
    return x, torch.where(zero_b, 0.0, r0), mv


def _start(
    b: Tensor, x: Tensor, rnorm: Tensor, rz: Tensor, stop: Tensor, has_m: bool
) -> tuple[Tensor, Tensor]:
    """Per-column status code and running mask before the first iteration."""
    finite = _allfinite(b) & _allfinite(x) & torch.isfinite(rnorm) & torch.isfinite(rz)
    done = finite & (rnorm <= stop)
    # Without M, rᴴr == 0 with ‖r‖ > stop can only be underflow: treat as converged.
    indefinite = finite & ~done & (rz <= 0)
    code = torch.full(rnorm.shape, CODE["MAX_ITERATIONS"], dtype=torch.int8, device=b.device)
    code = torch.where(~finite, CODE["NON_FINITE"], code)
    code = torch.where(done, CODE["CONVERGED"], code)
    bad_rz = CODE["INDEFINITE_PRECONDITIONER"] if has_m else CODE["CONVERGED"]
    code = torch.where(indefinite, bad_rz, code)
    return code, finite & ~done & ~indefinite


def fixed_vector_cg(matvec: Matvec, b: Tensor, bnorm: Tensor, maxiter: int) -> Run | None:
    """:func:`block_cg` with ``fixed=True`` for a real CPU ``b`` ``(n,)``, ``x0 = 0``, no
    preconditioner and no callback, when every one of the ``maxiter`` iterations is an
    ordinary CG step; else ``None``.

    Each value is computed by the tensor operation :func:`block_cg` uses for it, in the same
    order (its ``torch.where`` of an active column is the identity), so the result is the same
    to the bit. Per iteration, four host reads replace the masks: ``pᵀq`` finite and positive
    (a non-finite ``q`` or ``p`` makes it non-finite), ``α``, ``‖r‖`` and ``Σ x`` finite (an
    overflow of the sum only sends the solve to the caller's fallback), ``‖r‖ > ε·‖b‖`` and
    ``rᵀr > 0``. The first that fails returns ``None``, having applied the operator ``i + 1``
    times for nothing: the caller's :func:`block_cg` from the start then gives the status.
    """
    stop = (torch.finfo(b.dtype).eps * bnorm).item()
    r = b.clone()
    x = torch.zeros_like(b)
    rnorm = torch.linalg.vector_norm(r, dim=0)
    rz = _dot(r, r)
    rnorm_v, rz_v = rnorm.item(), rz.item()
    if not (math.isfinite(rnorm_v) and math.isfinite(rz_v) and rnorm_v > stop and rz_v > 0):
        return None
    p = r.clone()
    for _ in range(maxiter):
        q = matvec(p.clone())  # block_cg hands the operator a fresh tensor too
        pq = _dot(p, q)
        pq_v = pq.item()
        if not (math.isfinite(pq_v) and pq_v > 0):
            return None
        alpha = rz / pq
        x_new = x + alpha * p
        r_new = r - alpha * q
        rnorm_new = torch.linalg.vector_norm(r_new, dim=0)
        rnorm_v = rnorm_new.item()
        ok = math.isfinite(alpha.item()) and math.isfinite(x_new.sum().item())
        if not (ok and math.isfinite(rnorm_v) and rnorm_v > stop):
            return None
        x, r, rnorm = x_new, r_new, rnorm_new
        rz_new = _dot(r, r)
        rz_v = rz_new.item()
        if not (math.isfinite(rz_v) and rz_v > 0):
            return None
        p = r + (rz_new / rz) * p
        rz = rz_new
    return Run(
        x=x,
        r=r,
        rnorm=rnorm,
        code=torch.tensor(CODE["MAX_ITERATIONS"], dtype=torch.int8),
        iterations=torch.tensor(maxiter, dtype=torch.int64),
        direction=torch.zeros_like(b),
        curvature=torch.zeros_like(rnorm),
        matvecs=maxiter,
        checked=torch.tensor(False),
    )


def block_cg(
    matvec: Matvec,
    precond: Matvec | None,
    b: Tensor,
    x0: Tensor | None,
    bnorm: Tensor,
    tol: Tensor,
    maxiter: int,
    callback: Callable[[CGIterate], None] | None,
    fixed: bool,
    *,
    r0: Tensor | None = None,
    offset: int = 0,
) -> Run:
    """Column-masked CG of ``b`` ``(n,)`` or ``(n, k)``; no host sync when ``fixed``.

    Each column stops when ``‖r‖ ≤ max(tol, ε·‖b‖)`` or on a breakdown and is then frozen
    by ``torch.where``: frozen columns apply the operator to 0, so a stale ``p`` cannot leak
    NaN, and every division is by a denominator known to be positive.
    """
    finfo = torch.finfo(b.dtype)
    conv, npc = CODE["CONVERGED"], CODE["NON_POSITIVE_CURVATURE"]
    bad_m, nonfinite = CODE["INDEFINITE_PRECONDITIONER"], CODE["NON_FINITE"]
    stop = torch.maximum(tol, finfo.eps * bnorm)
    x, r, matvecs = _initial(matvec, b, x0, r0, bnorm == 0, fixed)
    rnorm = torch.linalg.vector_norm(r, dim=0)
    z = r if precond is None else precond(r)
    rz = _dot(r, z)
    code, active = _start(b, x, rnorm, rz, stop, precond is not None)
    p = z.clone() if z is r else z
    iterations = torch.zeros(rnorm.shape, dtype=torch.int64, device=b.device)
    direction = torch.zeros_like(b)
    curvature = torch.zeros_like(rnorm)

    for i in range(maxiter):
        if not fixed and not bool(active.any()):  # tolerance mode: one host read
            break
        p_used = p
        q = matvec(torch.where(active, p, 0.0))
        matvecs += 1
        pq = _dot(p, q)
        q_ok = _allfinite(q) & torch.isfinite(pq)
        broke_nonfinite = active & ~q_ok
        broke_npc = active & q_ok & (pq <= 0)
        # pᴴAp = 0 with rᴴz below the smallest normal: the direction underflowed.
        underflow = broke_npc & (pq == 0) & (rz < finfo.tiny)
        broke_npc = broke_npc & ~underflow
        step = active & q_ok & (pq > 0)
        alpha = torch.where(step, rz / torch.where(step, pq, 1.0), 0.0)
        x_new = x + alpha * p
        r_new = r - alpha * q
        rnorm_new = torch.linalg.vector_norm(r_new, dim=0)
        upd_ok = torch.isfinite(alpha) & _allfinite(x_new) & torch.isfinite(rnorm_new)
        broke_nonfinite = broke_nonfinite | (step & ~upd_ok)
        step = step & upd_ok
        x = torch.where(step, x_new, x)
        r = torch.where(step, r_new, r)
        rnorm = torch.where(step, rnorm_new, rnorm)
        iterations = iterations + step.to(torch.int64)
        converged_now = (step & (rnorm <= stop)) | underflow

        z = r if precond is None else precond(r)
        rz_new = _dot(r, z)
        cont = step & ~converged_now
        z_ok = torch.isfinite(rz_new) & (_allfinite(z) if precond is not None else True)
        broke_nonfinite = broke_nonfinite | (cont & ~z_ok)
        broke_rz = cont & z_ok & (rz_new <= 0)
        cont = cont & z_ok & (rz_new > 0)
        beta = torch.where(cont, rz_new / torch.where(cont, rz, 1.0), 0.0)
        p = torch.where(cont, z + beta * p, p)
        rz = torch.where(cont, rz_new, rz)

        direction = torch.where(broke_npc, p_used, direction)
        curvature = torch.where(broke_npc, pq, curvature)
        code = torch.where(converged_now, conv, code)
        code = torch.where(broke_npc, npc, code)
        code = torch.where(broke_rz, conv if precond is None else bad_m, code)
        code = torch.where(broke_nonfinite, nonfinite, code)
        active = cont
        if callback is not None:
            callback(CGIterate(offset + i + 1, x, r, p_used, alpha, rnorm, active))

    return Run(
        x=x,
        r=r,
        rnorm=rnorm,
        code=code,
        iterations=iterations,
        direction=direction,
        curvature=curvature,
        matvecs=matvecs,
        checked=torch.zeros_like(active),
    )
