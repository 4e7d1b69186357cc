"""``natgrad.minimize``: Newton-type minimisation of a scalar function of tensors.

The counterpart of :func:`scipy.optimize.minimize` for ``method="trust-ncg"``,
``method="trust-krylov"`` and ``method="newton-cg"``, with gradients and Hessian-vector
products by autograd (no numpy round trip, any device). The result has scipy's fields and
meanings (``x, fun, grad`` (alias ``jac``), ``nit, nfev, njev, nhev, status, message,
success``), so a scipy user switches by changing the import and passing tensors.

**trust-ncg** (Nocedal & Wright, *Numerical Optimization*, Alg. 4.1 with the subproblem
solved by Steihaug's CG, Alg. 7.2, i.e. scipy's ``trust-ncg``): at ``x_k`` with
``g = ∇f(x_k)``, ``H = ∇²f(x_k)``::

    p   = steihaug_solve(H, g, Δ, rtol=min(0.5, √‖g‖), reorthogonalize=n ≤ 2000)
    ρ   = (f(x_k) − f(x_k + p)) / −m(p),    m(p) = gᵀp + ½pᵀHp
    Δ  ← Δ/4                  if ρ < 1/4
    Δ  ← min(2Δ, Δ_max)       if ρ > 3/4 and ‖p‖ = Δ
    x_{k+1} = x_k + p if ρ > η else x_k

Unlike scipy, the CG residuals are reorthogonalised against the previous ones while the
problem is small enough to keep them (``n ≤ REORTHOGONALIZE_MAX_N = 2000`` by default:
``n × k`` values after ``k`` products, at most ``n + 1`` of them): the Steihaug point is
then that of exact arithmetic, which plain CG, losing orthogonality, reaches only after
many more products on badly conditioned problems (logistic regression with column scales
1e-2…1e2: 739 → 327 products, docs/optim.md).

**trust-krylov** (scipy's ``trust-krylov``): the same trust-region loop with the subproblem
solved by GLTR (:func:`natgrad.trust_krylov.trust_krylov_solve`, Gould, Lucidi, Roma &
Toint 1999): Lanczos on ``H`` from ``g`` and the exact solution of the subproblem in the
Krylov subspace, to ``rtol = min(0.5, ‖g‖)`` (scipy's trust-krylov forcing, quadratic
convergence; against ``√‖g‖`` it took as many or fewer outer iterations on 7 of the 8 runs
of ``bench/trust_krylov_counts.py``); it keeps the Lanczos basis (``n × k``) and, like
scipy, does not explore past an invariant subspace (``explore_invariant=False``).

**newton-cg** (Nocedal & Wright Alg. 7.1, line-search Newton-CG): ``p`` solves
``H p = −g`` by :func:`natgrad.cg.cg_solve` to ``rtol = min(0.5, √‖g‖)``; if CG meets
``pᵀHp ≤ 0`` the last CG iterate is used (``−g`` if that is the first); then Armijo
backtracking ``f(x + αp) ≤ f(x) + 10⁻⁴ α gᵀp``, ``α = 1, ½, ¼, …`` (scipy uses a Wolfe
line search instead).

All three stop when ``‖∇f(x)‖₂ ≤ gtol`` (scipy's trust-ncg rule; scipy's Newton-CG instead
stops on the step length ``xtol``), after ``maxiter`` iterations, when no decrease is
predicted or found, or when ``callback`` asks to.

Example:
    >>> import torch
    >>> def rosen(x):
    ...     return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
    >>> res = minimize(rosen, torch.zeros(5, dtype=torch.float64), method="trust-ncg", gtol=1e-9)
    >>> res.success, res.status, bool((res.x - 1).abs().max() < 1e-8)
    (True, <OptimizeStatus.SUCCESS: 'success'>, True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from natgrad.cg import cg_solve
from natgrad.curvature import value_grad_hessian
from natgrad.params import ParamSpace, flat_grad
from natgrad.status import ResultStatus, SolverError, Status
from natgrad.steihaug import SteihaugResult, steihaug_solve
from natgrad.trust_krylov import TrustKrylovResult, trust_krylov_solve

__all__ = ["METHODS", "REORTHOGONALIZE_MAX_N", "OptimizeError", "OptimizeResult", "OptimizeStatus", "minimize"]

#: The methods of :func:`minimize`.
METHODS = ("trust-ncg", "trust-krylov", "newton-cg")

#: trust-ncg reorthogonalises its CG residuals by default up to this many variables.
REORTHOGONALIZE_MAX_N = 2000


def _superlinear(gnorm: float) -> float:
    """Inner tolerance ``min(0.5, √‖g‖)``: superlinear convergence (scipy's trust-ncg)."""
    return min(0.5, math.sqrt(gnorm))


def _quadratic(gnorm: float) -> float:
    """Inner tolerance ``min(0.5, ‖g‖)``: quadratic convergence (scipy's trust-krylov)."""
    return min(0.5, gnorm)


#: Each trust-region method: its subproblem solver and its inner tolerance ``rtol(‖g‖)``
#: (the loop, :func:`_trust_ncg`, is the same). trust-krylov does not explore past an
#: invariant Krylov subspace (scipy's trlib default): that only matters in the hard case,
#: which the outer loop survives, and the restart costs products on structured problems.
TRUST_REGION_METHODS = {
    "trust-ncg": (steihaug_solve, _superlinear),
    "trust-krylov": (functools.partial(trust_krylov_solve, explore_invariant=False), _quadratic),
}

X = Tensor | Mapping[str, Tensor]


class OptimizeStatus(Status):
    """Why :func:`minimize` stopped; :meth:`Status.code` is scipy's integer ``status``."""

    SUCCESS = "success", "Optimization terminated successfully: ‖∇f(x)‖ ≤ gtol.", True
    MAX_ITERATIONS = (
        "max_iterations",
        "Maximum number of iterations has been exceeded: raise maxiter, loosen gtol, or "
        "rescale the variables (a badly scaled problem needs many iterations)",
        False,
    )
    NO_PROGRESS = (
        "no_progress",
        "No decrease predicted or found (a bad approximation caused failure to predict "
        "improvement, or the line search failed): ∇f or the Hessian products may be "
        "inaccurate (float32?), or gtol is below what the precision allows",
        False,
    )
    NON_FINITE = (
        "non_finite",
        "NaN or inf in ∇f(x) or in the Hessian-vector products at an accepted point; check "
        "fun for overflow (log/exp of large values) and the dtype",
        False,
    )
    CALLBACK = "callback", "Stopped by the callback (it returned True or raised StopIteration)", False


class OptimizeError(SolverError):
    """Raised by :meth:`OptimizeResult.raise_if_failed`; ``.result`` holds the result."""


@dataclass(frozen=True)
class OptimizeResult(ResultStatus):
    """Result of :func:`minimize`, with scipy's field names and meanings.

    Attributes:
        x: The solution, a tensor shaped like ``x0`` or a dict like ``x0``.
        fun: ``f(x)``, a 0-d tensor.
        grad: ``∇f(x)``, structured like ``x`` (:attr:`jac` is the scipy alias).
        nit: Iterations done (accepted or not, as scipy counts).
        nfev: Evaluations of ``fun``.
        njev: Evaluations of the gradient (each together with ``fun``).
        nhev: Hessian-vector products (CG/Steihaug operator applications).
        status_code: 0-d int8 tensor, :meth:`Status.code` of :attr:`status` (0 success,
            1 max iterations, 2 no progress, as scipy's trust-ncg ``status``).
    """

    status_type = OptimizeStatus
    error_type = OptimizeError

    x: X
    fun: Tensor
    grad: X
    nit: int
    nfev: int
    njev: int
    nhev: int
    status_code: Tensor

    @property
    def jac(self) -> X:
        """scipy's name for :attr:`grad`."""
        return self.grad


class _Problem:
    """``fun`` on flat vectors: value/gradient, Hessian operator, counters."""

    def __init__(self, fun: Callable[..., Tensor], x0: X, args: tuple, hvp: Any) -> None:
        self.is_dict = isinstance(x0, Mapping)
        if not self.is_dict and not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a tensor or a dict of tensors, got {type(x0).__name__}")
        params = dict(x0) if self.is_dict else {"x": x0}
        for name, t in params.items():
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"x0[{name!r}] must be a floating-point tensor")
        self.space = ParamSpace(params)
        self.x0 = self.space.ravel({k: v.detach() for k, v in params.items()})
        self.fun, self.args, self.hvp = fun, args, hvp
        self.nfev = self.nhev = 0

    def user(self, flat: Tensor) -> X:
        """The flat vector in the structure of ``x0`` (a copy, detached)."""
        parts = self.space.unravel(flat.detach().clone())
        return parts if self.is_dict else parts["x"]

    def _dict_fun(self, p: Mapping[str, Tensor], *args: Any) -> Tensor:
        out = self.fun(p if self.is_dict else p["x"], *args)
        if not isinstance(out, Tensor) or out.numel() != 1:
            what = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"fun must return a scalar tensor, got {what}")
        return out

    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """``f(x)``, flat ``∇f(x)`` and ``v -> ∇²f(x) v`` (products counted in ``nhev``).

        By :func:`natgrad.value_grad_hessian`: one forward and one ``create_graph`` backward,
        whose graph then serves every Hessian product (double backprop). With a user
        ``hvp`` the gradient is a plain backward and the products are the user's.
        """
        self.nfev += 1
        at = self.space.unravel(x)
        if self.hvp is None:
            f, g, op = value_grad_hessian(self._dict_fun, at, *self.args)
        else:
            f, g = flat_grad(self._dict_fun, at, *self.args)
            xu = self.user(x)

            def op(v: Tensor) -> Tensor:
                out = self.hvp(xu, self.user(v), *self.args)
                return self.space.ravel(out) if self.is_dict else out.reshape(-1)

        def counted(v: Tensor) -> Tensor:
            self.nhev += 1
            return op(v)

        return f, g, counted


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def minimize(
    fun: Callable[..., Tensor],
    x0: X,
    *,
    method: str = "trust-ncg",
    args: tuple = (),
    gtol: float = 1e-5,
    maxiter: int | None = None,
    hvp: Callable[..., Any] | None = None,
    M: Any = None,
    callback: Callable[[X], Any] | None = None,
    initial_trust_radius: float = 1.0,
    max_trust_radius: float = 1000.0,
    eta: float = 0.15,
    cg_maxiter: int | None = None,
    reorthogonalize: bool | None = None,
) -> OptimizeResult:
    """Minimise ``fun(x, *args)`` by a trust-region Newton method or line-search Newton-CG.

    The methods, formulas and stopping rules are in the module docstring; the loop stops
    at the first of ``‖∇f(x)‖₂ ≤ gtol``, ``maxiter`` iterations, no predicted/found
    decrease, or ``callback``.

    Args:
        fun: ``fun(x, *args) -> scalar tensor``, twice differentiable by autograd (or
            once, with ``hvp``). ``x`` is a tensor shaped like ``x0`` or a dict like it.
        x0: Starting point: a floating tensor (any shape) or a dict of tensors sharing
            one dtype and device. Never modified.
        method: ``"trust-ncg"`` (default; Steihaug's CG), ``"trust-krylov"`` (GLTR:
            the exact subproblem solution in the Krylov subspace; usually fewer outer
            iterations on indefinite problems, stores the Lanczos basis) or ``"newton-cg"``.
        args: Extra positional arguments of ``fun`` (and ``hvp``).
        gtol: Stop when ``‖∇f(x)‖₂ ≤ gtol``; ``≥ 0``.
        maxiter: Iteration limit; default ``200·n`` (as scipy).
        hvp: Optional ``hvp(x, v, *args) -> ∇²f(x) v`` (scipy's ``hessp``), ``x`` and
            ``v`` (and the result) structured like ``x0``; default: autograd.
        M: Optional preconditioner applying ``M⁻¹`` on flat vectors (anything
            :func:`natgrad.cg.cg_solve` accepts); for trust-ncg it also sets the norm of
            the trust region, ``‖p‖_M``, as for trust-krylov.
        callback: ``callback(x)`` after each iteration; returning True or raising
            ``StopIteration`` stops with status ``CALLBACK``.
        initial_trust_radius: ``Δ₀ > 0`` (trust-ncg, trust-krylov).
        max_trust_radius: ``Δ_max ≥ Δ₀`` (trust-ncg, trust-krylov).
        eta: Acceptance threshold ``η ∈ [0, 1/4)`` on ``ρ`` (trust-ncg, trust-krylov).
        cg_maxiter: Inner iteration limit per step; default ``10·n`` (trust-krylov: ``n``,
            its cap; the Lanczos basis then holds up to ``n × cg_maxiter`` values).
        reorthogonalize: trust-ncg: reorthogonalise the CG residuals
            (:func:`natgrad.steihaug.steihaug_solve`); default ``n ≤
            REORTHOGONALIZE_MAX_N``. trust-krylov always does, newton-cg never.

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        ValueError: Unknown ``method``; ``fun`` not returning a scalar; non-finite
            ``f(x0)`` or ``∇f(x0)``; bad ``gtol``, ``maxiter``, radii or ``eta``.
        TypeError: ``x0`` not a floating tensor or dict of them.
    """
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}"
        )
    if not (float(gtol) >= 0):
        raise ValueError(f"gtol must be >= 0, got {gtol}")
    radius0 = _check_positive("initial_trust_radius", initial_trust_radius)
    radius_max = _check_positive("max_trust_radius", max_trust_radius)
    if radius_max < radius0:
        raise ValueError(
            f"max_trust_radius ({radius_max}) must be >= initial_trust_radius ({radius0})"
        )
    if not 0.0 <= float(eta) < 0.25:
        raise ValueError(f"eta must be in [0, 0.25), got {eta}")
    prob = _Problem(fun, x0, tuple(args), hvp)
    n = prob.space.numel
    maxiter = 200 * n if maxiter is None else maxiter
    if isinstance(maxiter, bool) or not isinstance(maxiter, Integral) or maxiter < 0:
        raise ValueError(f"maxiter must be an int >= 0, got {maxiter!r}")
    f, g, hess = prob.evaluate(prob.x0)
    if not bool(torch.isfinite(f) & torch.isfinite(g).all()):
        raise ValueError(f"fun or its gradient is not finite at x0 (f(x0) = {float(f)})")
    opts = dict(
        gtol=float(gtol), maxiter=int(maxiter), M=M, callback=callback,
        cg_maxiter=cg_maxiter,
    )
    if method in TRUST_REGION_METHODS:
        solver, forcing = TRUST_REGION_METHODS[method]
        if method == "trust-ncg":
            reorth = n <= REORTHOGONALIZE_MAX_N if reorthogonalize is None else reorthogonalize
            solver = functools.partial(solver, reorthogonalize=bool(reorth))
        x, f, g, nit, status = _trust_ncg(prob, f, g, hess, radius0, radius_max, float(eta),
                                          solver=solver, forcing=forcing, **opts)
    else:
        x, f, g, nit, status = _newton_cg(prob, f, g, hess, **opts)
    return OptimizeResult(
        x=prob.user(x),
        fun=f.detach(),
        grad=prob.user(g),
        nit=nit,
        nfev=prob.nfev,
        njev=prob.nfev,
        nhev=prob.nhev,
        status_code=torch.tensor(OptimizeStatus.code(status), dtype=torch.int8),
    )


def _stop(
    callback: Callable[[X], Any] | None, prob: _Problem, x: Tensor, gnorm: float, gtol: float
) -> OptimizeStatus | None:
    """The status that ends the run after an iteration, if any: a non-finite gradient at the
    accepted point, the callback (returning True or raising StopIteration), ``‖∇f‖ ≤ gtol``."""
    if not math.isfinite(gnorm):
        return OptimizeStatus.NON_FINITE
    if callback is not None:
        try:
            if callback(prob.user(x)) is True:
                return OptimizeStatus.CALLBACK
        except StopIteration:
            return OptimizeStatus.CALLBACK
    return OptimizeStatus.SUCCESS if gnorm <= gtol else None


def update_radius(radius: float, rho: float, sub: SteihaugResult | TrustKrylovResult,
                  radius_max: float) -> float:
    """Nocedal & Wright Alg. 4.1: ``Δ/4`` if ``ρ < 1/4``, ``min(2Δ, Δ_max)`` if ``ρ > 3/4`` on
    the boundary, else ``Δ``.

    A rejected interior step is the same for every radius above ``‖p‖_M``, so the radius is
    quartered until below it at once instead of re-solving to the same step.
    """
    on_boundary = bool(sub.on_boundary)
    if rho < 0.25:
        radius *= 0.25
        if not on_boundary:
            p_norm = float(sub.p_norm)
            while radius >= p_norm and radius > 0:
                radius *= 0.25
    elif rho > 0.75 and on_boundary:
        radius = min(2.0 * radius, radius_max)
    return radius


def reduction_ratio(f: float, f_try: float, predicted: float, eps: float) -> float:
    """``ρ = (f − f_try) / predicted``, guarded against rounding.

    Near the optimum both reductions fall below the rounding of ``f`` and their ratio is
    noise; adding ``δ = 10·eps·max(1, |f|)`` (``eps`` of the dtype) to both (Conn, Gould & Toint, *Trust-Region
    Methods*, §17.4.2) makes ``ρ → 1`` there, so a step the model predicts well to
    within rounding is accepted. A non-finite ``f_try`` gives ``ρ = −∞`` (reject).
    """
    if not math.isfinite(f_try):
        return -math.inf
    delta = 10 * eps * max(1.0, abs(f))
    return (f - f_try + delta) / (predicted + delta)


def _trust_ncg(prob, f, g, hess, radius, radius_max, eta, *, solver, forcing, gtol, maxiter, M,
               callback, cg_maxiter):
    """Nocedal & Wright Alg. 4.1 (module docstring) with the subproblem ``solver``:
    :func:`natgrad.steihaug.steihaug_solve` (trust-ncg) or
    :func:`natgrad.trust_krylov.trust_krylov_solve` (trust-krylov), called alike, to the
    inner tolerance ``rtol = forcing(‖g‖)``."""
    x = prob.x0
    eps = torch.finfo(x.dtype).eps
    gnorm = float(torch.linalg.vector_norm(g))
    if gnorm <= gtol:
        return x, f, g, 0, OptimizeStatus.SUCCESS
    for k in range(1, maxiter + 1):
        sub = solver(
            hess, g, radius, rtol=forcing(gnorm), maxiter=cg_maxiter, M=M,
            check_finite=False,
        )
        predicted = -float(sub.model_value)
        if not predicted > 0:  # also NaN: the model promises nothing
            return x, f, g, k, OptimizeStatus.NO_PROGRESS
        x_try = x + sub.p
        f_try, g_try, hess_try = prob.evaluate(x_try)
        rho = reduction_ratio(float(f), float(f_try), predicted, eps)
        radius = update_radius(radius, rho, sub, radius_max)
        if rho > eta:
            x, f, g, hess = x_try, f_try, g_try, hess_try
            gnorm = float(torch.linalg.vector_norm(g))
        if status := _stop(callback, prob, x, gnorm, gtol):
            return x, f, g, k, status
    return x, f, g, maxiter, OptimizeStatus.MAX_ITERATIONS


_ARMIJO_C1 = 1e-4
_MAX_BACKTRACKS = 40


def _newton_cg(prob, f, g, hess, *, gtol, maxiter, M, callback, cg_maxiter):
    """Nocedal & Wright Alg. 7.1 with Armijo backtracking (module docstring)."""
    x = prob.x0
    gnorm = float(torch.linalg.vector_norm(g))
    if gnorm <= gtol:
        return x, f, g, 0, OptimizeStatus.SUCCESS
    for k in range(1, maxiter + 1):
        cg = cg_solve(
            hess, -g, rtol=min(0.5, math.sqrt(gnorm)), maxiter=cg_maxiter, M=M,
            check_finite=False,
        )
        p = cg.x
        slope = float(g @ p)
        if not slope < 0:
            # pᵀHp ≤ 0 at the first CG iteration (p = 0), or a useless direction: steepest
            # descent, as Nocedal & Wright's Alg. 7.1 prescribes.
            p, slope = -g, -gnorm * gnorm
        alpha = 1.0
        for _ in range(_MAX_BACKTRACKS):
            f_try, g_try, hess_try = prob.evaluate(x + alpha * p)
            if bool(f_try <= f + _ARMIJO_C1 * alpha * slope):  # False for NaN
                break
            alpha *= 0.5
        else:
            return x, f, g, k, OptimizeStatus.NO_PROGRESS
        x, f, g, hess = x + alpha * p, f_try, g_try, hess_try
        gnorm = float(torch.linalg.vector_norm(g))
        if status := _stop(callback, prob, x, gnorm, gtol):
            return x, f, g, k, status
    return x, f, g, maxiter, OptimizeStatus.MAX_ITERATIONS

