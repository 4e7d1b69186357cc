"""natgrad: matrix-free natural-gradient and trust-region linear algebra for PyTorch.

* :mod:`natgrad.params`: :class:`ParamSpace` (parameter dict <-> flat vector), :func:`flat_grad`.
* :mod:`natgrad.linop`: :class:`LinearOperator` on flat vectors (damping, algebra: ``@``,
  ``.T``, ``.H``, ``+``, ``*``; dense, to/from scipy).
* :mod:`natgrad.curvature`: Hessian / GGN / Fisher / KL-Hessian operators (one batch or a
  dataset), :func:`value_grad_hessian`; one module each (hessian, ggn, fisher).
* :mod:`natgrad.cg`: :class:`CG` (settings as a value), :func:`cg_solve` -> :class:`CGResult`.
* :mod:`natgrad.status`: the one status mechanism (:class:`Status`, :class:`SolverError`).
* :mod:`natgrad.trust_region`: :func:`natural_step`.
* :mod:`natgrad.backtracking`: :func:`line_search`.
* :mod:`natgrad.distributed`: all-reduce wrappers for data parallelism (no-ops single-process).
* :mod:`natgrad.steihaug`: :func:`steihaug_solve` (trust-region subproblem) -> :class:`SteihaugResult`.
* :mod:`natgrad.trust_krylov`: :func:`trust_krylov_solve` (GLTR, the same subproblem by Lanczos)
  -> :class:`TrustKrylovResult`.
* :mod:`natgrad.minimize`: :func:`minimize` (trust-ncg, trust-krylov, newton-cg) ->
  :class:`OptimizeResult`.
* :mod:`natgrad.optim`: ``torch.optim`` optimizers HessianFree, NaturalGradient, TrustRegionNewton.
* :mod:`natgrad.spectral`: Lanczos eigenpairs, SLQ spectral density, Hutchinson/Hutch++ trace.
* :mod:`natgrad.mlp`: a plain MLP written out (forward, ``J v``, ``Jᵀ u``, the fast Fisher,
  the flat-buffer fused-Adam trainer); :mod:`natgrad.adam`: :class:`~natgrad.adam.Adam`,
  ``torch.optim.Adam``'s arithmetic without the ``torch._dynamo`` import.

natgrad knows nothing of reinforcement learning: any model and any loss can use it.
"""

from natgrad import distributed, optim, spectral
from natgrad.backtracking import LineSearchResult, LineSearchStatus, line_search
from natgrad.cg import CG, CGError, CGIterate, CGResult, CGStatus, cg_solve
from natgrad.curvature import (
    FAMILIES,
    HESSIAN_METHODS,
    CurvatureOperator,
    fisher_operator,
    ggn_operator,
    hessian_operator,
    kl_hessian_operator,
    value_grad_hessian,
)
from natgrad.linop import LinearOperator
from natgrad.minimize import OptimizeError, OptimizeResult, OptimizeStatus, minimize
from natgrad.params import ParamSpace, flat_grad
from natgrad.status import ResultStatus, SolverError, Status
from natgrad.steihaug import SteihaugError, SteihaugResult, SteihaugStatus, steihaug_solve
from natgrad.trust_krylov import (
    TrustKrylovError,
    TrustKrylovResult,
    TrustKrylovStatus,
    trust_krylov_solve,
)
from natgrad.trust_region import NaturalStep, StepStatus, natural_step

__version__ = "0.1.0"

__all__ = [
    "CG",
    "FAMILIES",
    "HESSIAN_METHODS",
    "CGError",
    "CGIterate",
    "CGResult",
    "CGStatus",
    "CurvatureOperator",
    "LineSearchResult",
    "LineSearchStatus",
    "LinearOperator",
    "NaturalStep",
    "ParamSpace",
    "ResultStatus",
    "SolverError",
    "Status",
    "StepStatus",
    "cg_solve",
    "distributed",
    "fisher_operator",
    "flat_grad",
    "ggn_operator",
    "hessian_operator",
    "kl_hessian_operator",
    "line_search",
    "natural_step",
    "value_grad_hessian",
    # natgrad-optim: second-order optimisation
    "OptimizeError",
    "OptimizeResult",
    "OptimizeStatus",
    "SteihaugError",
    "SteihaugResult",
    "SteihaugStatus",
    "TrustKrylovError",
    "TrustKrylovResult",
    "TrustKrylovStatus",
    "minimize",
    "optim",
    "spectral",
    "steihaug_solve",
    "trust_krylov_solve",
]
