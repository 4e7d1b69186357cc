"""Conjugate gradients for ``(A + λI) x = b`` with a matrix-free Hermitian ``A``.

The iteration is the one of the seed notes (TRPO notes, "共轭法求解过程"), with an
optional preconditioner ``M`` (a callable applying ``M⁻¹``); ``uᴴv`` is the real dot
product for real dtypes and ``vdot`` for complex ones::

    x₀ = x0 or 0,   r₀ = b − (A + λI) x₀,   z₀ = M⁻¹ r₀,   p₀ = z₀
    repeat:
        q  = (A + λI) p                          one operator application
        α  = rᴴz / pᴴq                           (rᴴr / pᴴAp without M)
        x ← x + α p,   r ← r − α q
        stop if ‖r‖ ≤ max(rtol·‖b‖, atol, ε·‖b‖)
        z' = M⁻¹ r,   β = r'ᴴz' / rᴴz            (r'ᴴr' / rᴴr without M)
        p ← z' + β p

``ε`` is the dtype's machine epsilon: a recursive residual below ``ε·‖b‖`` is rounding
noise, and iterating on it only drives ``pᴴAp`` to underflow (a zero-curvature
"breakdown" that is none). ``b`` may be one right-hand side ``(n,)`` or a block ``(n, k)``
of ``k`` independent systems sharing the operator; every scalar is then per column.

Two modes (:class:`CG` chooses from the tolerances):

* **tolerance mode** (``rtol > 0`` or ``atol > 0``, the default), like scipy. A single
  vector on the CPU runs a dedicated loop whose scalars are Python floats (two host reads
  per iteration, five small kernels); a block or a GPU vector runs the column-masked loop
  below and asks the host once per iteration whether a column still runs. Before it reports
  ``CONVERGED`` after ``≥ 10`` iterations (or when the tolerance is below ``ε·‖b‖``), the
  solver recomputes the true residual ``b − (A + λI)x`` (one operator application) and,
  if that misses the tolerance, restarts from ``x`` (at most twice, then ``INACCURATE``):
  the status refers to the true residual whenever ``result.residual_checked``.
* **fixed-iteration mode** (``rtol == atol == 0``): exactly ``maxiter`` operator
  applications (plus one for ``x0``) and no host synchronisation: no ``.item()``, no
  ``bool(tensor)``. Converged columns (``‖r‖ ≤ ε·‖b‖``, or a search direction whose
  curvature underflowed) and breakdowns (``pᴴAp ≤ 0``, NaN/inf) are frozen with
  ``torch.where``. This is TRPO's "10 CG iterations", queued asynchronously on a GPU. For
  one real vector on the CPU, where reading a scalar back is free, the same loop runs with
  Python checks instead of the masks (:func:`natgrad.cg_loops.fixed_vector_cg`: the same
  bits, ~5× less overhead per iteration); at a breakdown or convergence it hands over to
  the masked loop from the start, so the operator may then be applied up to ``2·maxiter``
  times.

Example:
    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> res = CG(rtol=1e-10).solve(A, b)
    >>> res.status, int(res.iterations)
    (<CGStatus.CONVERGED: 'converged'>, 2)
    >>> torch.allclose(res.x, torch.linalg.solve(A, b))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from natgrad.cg_loops import CODE, CGIterate, Run, block_cg, fixed_vector_cg, vector_cg
from natgrad.matvec import as_matvec, check_damping, damp, same_device
from natgrad.status import ResultStatus, SolverError, Status

__all__ = ["CG", "CGError", "CGIterate", "CGResult", "CGStatus", "cg_solve"]

# A converged solve of at least this many iterations has its true residual recomputed
# (rounding makes the recursive one drift); a failed check restarts at most _RESTARTS times.
CHECK_AFTER = 10
_RESTARTS = 2


class CGStatus(Status):
    """Why :func:`cg_solve` stopped (per column of the right-hand side), mildest first."""

    CONVERGED = (
        "converged",
        "converged: ‖r‖ ≤ max(rtol·‖b‖, atol) (fixed-iteration mode: ‖r‖ ≤ ε·‖b‖)",
        True,
    )
    MAX_ITERATIONS = (
        "max_iterations",
        "reached maxiter before ‖r‖ ≤ max(rtol·‖b‖, atol); increase maxiter, loosen "
        "rtol/atol, add damping or a preconditioner M (fine when a fixed number of "
        "iterations is intended: raise_if_failed(allow=('max_iterations',)))",
        False,
    )
    INACCURATE = (
        "inaccurate",
        "the recursive residual met the tolerance but the true residual ‖b − (A + λI)x‖ "
        "stays above it after restarts: the tolerance is below the accuracy attainable for "
        "this conditioning and dtype; loosen rtol/atol, use float64, add damping or a "
        "preconditioner M",
        False,
    )
    NON_POSITIVE_CURVATURE = (
        "non_positive_curvature",
        "non-positive curvature pᴴ(A + damping·I)p ≤ 0: the operator is not positive "
        "definite along result.direction; add damping (e.g. damping=1e-3 relative to the "
        "operator's scale) or check the curvature (the Hessian of a non-convex loss is "
        "indefinite: a Gauss-Newton or Fisher operator is positive semi-definite)",
        False,
    )
    INDEFINITE_PRECONDITIONER = (
        "indefinite_preconditioner",
        "rᴴM⁻¹r ≤ 0 with r ≠ 0: the preconditioner M is not positive definite; M must "
        "apply the inverse of a Hermitian positive definite matrix (e.g. r / d with a "
        "positive diagonal d)",
        False,
    )
    NON_FINITE = (
        "non_finite",
        "a NaN or inf appeared in the operator output, the preconditioner output or the "
        "iterates; check that A @ v is finite for finite v, the inputs b and x0, and the "
        "dtype (float32 overflow?)",
        False,
    )


assert tuple(CODE) == tuple(s.name for s in CGStatus)  # cg_loops' codes are these members


class CGError(SolverError):
    """Raised by :meth:`CGResult.raise_if_failed`; ``.result`` holds the :class:`CGResult`."""


@dataclass(frozen=True)
class CGResult(ResultStatus):
    """Result of :func:`cg_solve` / :meth:`CG.solve`.

    Shapes: for ``b`` of shape ``(n,)`` the per-column fields are 0-d tensors, for ``(n, k)``
    they have shape ``(k,)``. All tensor fields live on ``b``'s device, so building the
    result never synchronises with the host; ``status``, ``statuses``, ``success``,
    ``message`` and :meth:`raise_if_failed` (from :class:`~natgrad.status.ResultStatus`) do.

    Attributes:
        x: The solution, shape of ``b``. After a breakdown, the last iterate with a finite
            residual.
        iterations: Completed updates of ``x`` per column (int64). A breakdown iteration
            (``pᴴAp ≤ 0`` or non-finite) costs a matvec but is not counted.
        residual_norm: ``‖r‖`` per column: the true ``‖b − (A + λI)x‖`` where
            ``residual_checked``, else the recursively updated one.
        converged: The status is ``CONVERGED`` (per column, bool tensor).
        direction: For ``NON_POSITIVE_CURVATURE`` columns, the offending search direction
            ``p`` (``pᴴ(A + λI)p ≤ 0``); zeros in the other columns.
        curvature: ``pᴴ(A + λI)p`` of ``direction`` per column (0 elsewhere).
        tolerance: ``max(rtol·‖b‖, atol)`` per column (0 in fixed-iteration mode).
        matvecs: Operator applications done (Python int): one per loop iteration, one for
            ``x0``, one per true-residual check.
        maxiter: The iteration limit used.
        status_code: Per-column codes of :class:`CGStatus`; read ``statuses`` or use
            ``status_mask`` instead.
        residual: ``r = b − (A + λI)x`` of the returned ``x`` (shape of ``b``; true or
            recursive as ``residual_norm``): e.g. ``xᴴ(A + λI)x = xᴴ(b − r)`` with no
            further operator application.
        residual_checked: Per column, whether ``residual``/``residual_norm`` were recomputed
            as ``b − (A + λI)x`` at the end (bool tensor).
    """

    status_type = CGStatus
    error_type = CGError

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
    residual: Tensor
    residual_checked: Tensor

    @property
    def message(self) -> str:
        """A sentence for the most severe column: what happened, the numbers, what to try."""
        codes = self.status_code.reshape(-1)
        if codes.numel() == 0:
            return CGStatus.CONVERGED.message
        j = int(codes.argmax())
        status = CGStatus.from_code(int(codes[j]))
        it = int(self.iterations.reshape(-1)[j])
        rnorm = float(self.residual_norm.reshape(-1)[j])
        tol = float(self.tolerance.reshape(-1)[j])
        kind = "true" if bool(self.residual_checked.reshape(-1)[j]) else "recursive"
        where = f" in column {j}" if self.status_code.ndim else ""
        done = f"after {it} iteration" + ("" if it == 1 else "s")
        heads = {
            CGStatus.CONVERGED: f"CG converged{where} {done}: {kind} ‖r‖ = {rnorm:.3g}",
            CGStatus.MAX_ITERATIONS: (
                f"CG did not converge{where} in maxiter={self.maxiter} iterations: "
                f"‖r‖ = {rnorm:.3g} > tolerance {tol:.3g}"
            ),
            CGStatus.INACCURATE: (
                f"CG inaccurate{where} {done}: true ‖b − (A + λI)x‖ = {rnorm:.3g} > "
                f"tolerance {tol:.3g}"
            ),
            CGStatus.NON_POSITIVE_CURVATURE: (
                f"CG breakdown{where} {done}: pᴴ(A + λI)p = "
                f"{float(self.curvature.reshape(-1)[j]):.3g}"
            ),
            CGStatus.INDEFINITE_PRECONDITIONER: f"CG preconditioner breakdown{where} {done}",
            CGStatus.NON_FINITE: f"CG produced a non-finite value{where} {done}",
        }
        return f"{heads[status]}: {status.message}"

    def raise_if_failed(
        self, *, allow: tuple[Status | str, ...] = (), allow_max_iterations: bool = False
    ) -> CGResult:
        """Raise :class:`CGError` unless every column succeeded or has a status in ``allow``.

        Args:
            allow: Statuses also accepted, e.g. ``("max_iterations",)`` for truncated CG with
                a fixed number of iterations, as in TRPO; breakdowns still raise.
            allow_max_iterations: Shorthand for ``allow=("max_iterations",)``.
        """
        if allow_max_iterations:
            allow = (*allow, CGStatus.MAX_ITERATIONS)
        return super().raise_if_failed(allow=allow)


def _check_tolerance(name: str, value: Any) -> float:
    # scipy semantics: any number in [0, inf]; None, NaN, negatives and non-numbers are errors.
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0 (inf allowed), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CG:
    """Conjugate-gradient settings as a value: ``CG(rtol=1e-8).solve(A, b)``.

    Pass one to :func:`natgrad.trust_region.natural_step` (``solver=CG(maxiter=10,
    rtol=0.0)``) or keep it in a config; the problem (``A``, ``b``, ``x0``, ``damping``) is
    given to :meth:`solve`.

    Attributes:
        rtol: Relative tolerance, ``≥ 0`` (default 1e-5, as scipy); ``inf`` allowed.
        atol: Absolute tolerance, ``≥ 0`` (default 0); ``inf`` allowed (stops at once).
            ``rtol == atol == 0`` selects fixed-iteration mode (no host sync).
        maxiter: Iteration limit ``≥ 1``; default ``10·n`` (as scipy).
        M: Preconditioner applying ``M⁻¹`` (same kinds as ``A``, e.g. the Jacobi
            ``lambda r: r / d`` for a ``(n,)`` diagonal ``d``, ``d[:, None]`` for blocks).
        callback: Called after each loop iteration with a :class:`CGIterate`. It may read
            tensors (which syncs); in fixed-iteration mode leave it ``None`` to stay async.
        check_finite: Raise ``ValueError`` at once if ``b`` or ``x0`` holds NaN/inf (one
            host sync). With ``False`` such columns get ``NON_FINITE`` instead, and
            fixed-iteration mode is free of host syncs.

    Raises:
        ValueError: A tolerance that is None, negative, NaN or not a number; ``maxiter``
            not an int ``≥ 1``.
    """

    rtol: float = 1e-5
    atol: float = 0.0
    maxiter: int | None = None
    M: Any = None
    callback: Callable[[CGIterate], None] | None = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rtol", _check_tolerance("rtol", self.rtol))
        object.__setattr__(self, "atol", _check_tolerance("atol", self.atol))
        m = self.maxiter
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, Real) or not 1 <= m < math.inf:
                raise ValueError(f"maxiter must be an int >= 1 or None, got {m!r}")
            if m != int(m):
                raise ValueError(f"maxiter must be an int >= 1 or None, got {m!r}")
            object.__setattr__(self, "maxiter", int(m))

    @property
    def fixed_iterations(self) -> bool:
        """Whether this is fixed-iteration mode (``rtol == atol == 0``)."""
        return self.rtol == 0.0 and self.atol == 0.0

    def solve(
        self,
        A: Any,
        b: Tensor,
        *,
        x0: Tensor | None = None,
        damping: float = 0.0,
        b_name: str = "b",
    ) -> CGResult:
        """Solve ``(A + damping·I) x = b``; see :func:`cg_solve` for the arguments.

        ``b_name`` names ``b`` in error messages (e.g. ``"g"`` for a caller's gradient).
        """
        _check_rhs(b, x0, b_name, self.check_finite)
        damping = check_damping(damping)
        maxiter = self.maxiter if self.maxiter is not None else max(10 * b.shape[0], 1)
        matvec = damp(as_matvec(A, b, "A", b_name), damping)
        precond = None if self.M is None else as_matvec(self.M, b, "M", b_name)
        fixed = self.fixed_iterations
        bnorm = torch.linalg.vector_norm(b, dim=0)
        # inf·0 (rtol = inf, b = 0) is NaN: the tolerance of a zero column is atol.
        rel = torch.nan_to_num(self.rtol * bnorm, nan=0.0, posinf=math.inf)
        tol = torch.clamp(rel, min=self.atol)
        if fixed:
            run = None
            if _host_reads_are_free(b) and precond is None and x0 is None and not self.callback:
                run = fixed_vector_cg(matvec, b, bnorm, maxiter)  # same bits, fewer kernels
            if run is None:
                run = block_cg(matvec, precond, b, x0, bnorm, tol, maxiter, self.callback, True)
        elif b.ndim == 1 and b.device.type == "cpu":
            run = vector_cg(
                matvec, precond, b, x0, float(bnorm), float(tol), maxiter, self.callback
            )
            run = _verify(run, matvec, precond, b, bnorm, tol, maxiter, self.callback)
        else:
            run = block_cg(matvec, precond, b, x0, bnorm, tol, maxiter, self.callback, False)
            run = _verify(run, matvec, precond, b, bnorm, tol, maxiter, self.callback)
        return CGResult(
            x=run.x,
            iterations=run.iterations,
            residual_norm=run.rnorm,
            converged=run.code == CODE["CONVERGED"],
            direction=run.direction,
            curvature=run.curvature,
            tolerance=tol,
            matvecs=run.matvecs,
            maxiter=maxiter,
            status_code=run.code,
            residual=run.r,
            residual_checked=run.checked,
        )

    __call__ = solve


def _host_reads_are_free(b: Tensor) -> bool:
    """One real vector on the CPU, computed eagerly: reading a scalar back costs no device
    sync and breaks nothing (no dispatch mode, e.g. :class:`natgrad.cuda_graph.NoHostSync`
    or a tracing mode, and no ``torch.func`` transform is active)."""
    return (
        b.ndim == 1
        and b.device.type == "cpu"
        and not b.is_complex()
        and not is_in_torch_dispatch_mode()
        and not torch._C._are_functorch_transforms_active()
    )


def _check_rhs(b: Any, x0: Any, b_name: str, check_finite: bool) -> None:
    if not isinstance(b, Tensor):
        raise ValueError(f"{b_name} must be a torch.Tensor, got {type(b).__name__}")
    if b.ndim not in (1, 2) or not (b.dtype.is_floating_point or b.dtype.is_complex):
        raise ValueError(
            f"{b_name} must be a real floating or complex tensor of shape (n,) or (n, k), got "
            f"{tuple(b.shape)} {b.dtype}"
        )
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise ValueError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if x0.shape != b.shape or x0.dtype != b.dtype or not same_device(x0.device, b.device):
            raise ValueError(
                f"x0 must match {b_name} ({tuple(b.shape)} {b.dtype} on {b.device}), got "
                f"{tuple(x0.shape)} {x0.dtype} on {x0.device}"
            )
    if check_finite:
        for name, t in ((b_name, b), ("x0", x0)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{name} contains NaN or inf (pass check_finite=False to get a status)"
                )


def _verify(
    run: Run,
    matvec: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor] | None,
    b: Tensor,
    bnorm: Tensor,
    tol: Tensor,
    maxiter: int,
    callback: Callable[[CGIterate], None] | None,
) -> Run:
    """Tolerance mode: recompute ``b − (A + λI)x`` before trusting a long solve's CONVERGED.

    A column is checked when it converged after ``≥ CHECK_AFTER`` iterations, when its
    tolerance is below ``ε·‖b‖`` (the recursive residual cannot certify it), or after a
    restart. A column whose true residual misses the tolerance restarts from its ``x`` on
    the remaining iterations; after ``_RESTARTS`` restarts it is ``INACCURATE``.
    """
    conv = CODE["CONVERGED"]
    eps = torch.finfo(b.dtype).eps
    need = (run.code == conv) & ((run.iterations >= CHECK_AFTER) | (tol < eps * bnorm))
    need = need & (bnorm > 0)
    for attempt in range(_RESTARTS + 1):
        if not bool(need.any()):
            return run
        r_true = b - matvec(run.x)
        run.matvecs += 1
        true_norm = torch.linalg.vector_norm(r_true, dim=0)
        run.r = torch.where(need, r_true, run.r)
        run.rnorm = torch.where(need, true_norm, run.rnorm)
        run.checked = run.checked | need
        bad = need & ~(true_norm <= tol)
        left = maxiter - int(run.iterations.max())
        if not bool(bad.any()):
            return run
        if attempt == _RESTARTS or left < 1:
            run.code = torch.where(bad, CODE["INACCURATE"], run.code)
            return run
        run = _restart(run, bad, matvec, precond, b, bnorm, tol, left, callback)
        need = bad & (run.code == conv)
    return run


def _restart(
    run: Run,
    bad: Tensor,
    matvec: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor] | None,
    b: Tensor,
    bnorm: Tensor,
    tol: Tensor,
    left: int,
    callback: Callable[[CGIterate], None] | None,
) -> Run:
    """CG again from ``x`` with ``r`` = the true residual, on the columns in ``bad`` only."""
    offset = int(run.iterations.max())
    if b.ndim == 1:
        sub = vector_cg(
            matvec,
            precond,
            b,
            run.x,
            float(bnorm),
            float(tol),
            left,
            callback,
            r0=run.r,
            offset=offset,
        )
        sub.iterations = sub.iterations + run.iterations
        sub.matvecs += run.matvecs
        sub.checked = run.checked
        return sub
    idx = bad.nonzero().reshape(-1)
    sub = block_cg(
        matvec,
        precond,
        b[:, idx],
        run.x[:, idx],
        bnorm[idx],
        tol[idx],
        left,
        callback,
        False,
        r0=run.r[:, idx],
        offset=offset,
    )
    run.matvecs += sub.matvecs
    for name in ("x", "r", "direction"):
        getattr(run, name)[:, idx] = getattr(sub, name)
    for name in ("rnorm", "code", "curvature"):
        getattr(run, name)[idx] = getattr(sub, name)
    run.iterations[idx] += sub.iterations
    return run


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

    Same as ``CG(rtol=rtol, atol=atol, maxiter=maxiter, M=M, callback=callback,
    check_finite=check_finite).solve(A, b, x0=x0, damping=damping)``. CG as in the seed
    notes: ``α = rᴴr / pᴴAp``, ``x ← x + αp``, ``r ← r − αAp``, ``β = r'ᴴr' / rᴴr``,
    ``p ← r' + βp`` (with ``M``: ``z = M⁻¹r`` replaces ``r`` in the products and in ``p``).
    ``A + damping·I`` must be Hermitian positive definite (and ``M`` too).

    Stopping rule, per column: ``‖r‖ ≤ max(rtol·‖b‖, atol)`` (checked before the first
    iteration and after each update; ``r`` recursive, then verified as the true residual
    after ``≥ 10`` iterations, see the module docstring), ``‖r‖ ≤ ε·‖b‖`` (as far as the
    dtype goes), or ``maxiter`` iterations. With ``rtol == atol == 0``: exactly ``maxiter``
    iterations without host synchronisation. ``b = 0`` gives ``x = 0``, ``CONVERGED``,
    0 iterations, whatever ``x0`` (as scipy).

    Breakdowns stop the column and keep its last iterate: ``pᴴ(A + λI)p ≤ 0``
    (``NON_POSITIVE_CURVATURE``, offending ``p`` in ``result.direction``; never divided by),
    ``rᴴM⁻¹r ≤ 0`` (``INDEFINITE_PRECONDITIONER``), NaN/inf (``NON_FINITE``).

    Args:
        A: The operator: a :class:`natgrad.linop.LinearOperator` (or any object with
            ``.matvec`` and ``.shape``), a dense ``(n, n)`` tensor, a numpy/scipy matrix or
            ``scipy.sparse.linalg.LinearOperator`` (applied via numpy, not for GPU use), or
            a callable ``v -> A v`` that accepts the shape of ``b``.
        b: Right-hand side, ``(n,)`` or a block ``(n, k)``, real floating or complex.
        x0: Initial guess, shape/dtype/device of ``b``; default 0. Never modified.
        damping: ``λ ≥ 0`` added to the diagonal: solves ``(A + λI) x = b``.
        rtol, atol, maxiter, M, callback, check_finite: As the fields of :class:`CG`.

    Returns:
        A :class:`CGResult`; per-column fields have shape ``()`` for ``b`` of shape
        ``(n,)`` and ``(k,)`` for ``(n, k)``.

    Raises:
        ValueError: ``b`` is not 1-D/2-D floating or complex; shape, dtype or device
            mismatch of ``A``, ``x0`` or ``M`` with ``b``; a complex numpy/scipy ``A`` with a
            real ``b``; invalid ``damping``/``rtol``/``atol``/``maxiter``; non-finite
            ``b``/``x0`` with ``check_finite``.
        TypeError: ``A`` or ``M`` is of an unsupported kind.
    """
    solver = CG(rtol=rtol, atol=atol, maxiter=maxiter, M=M, callback=callback,
                check_finite=check_finite)  # fmt: skip
    return solver.solve(A, b, x0=x0, damping=damping)
