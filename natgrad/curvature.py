"""Matrix-free curvature operators on flat parameter vectors (re-exports).

Every constructor takes a pure function of a parameter dict (written with
:func:`torch.func.functional_call`) and the dict ``params`` at which the
curvature is taken, plus one batch (``*args``) or a dataset (``data=``), and
returns a :class:`CurvatureOperator`: a symmetric
:class:`~natgrad.linop.LinearOperator` of shape ``(n, n)`` on flat vectors
ordered as ``op.space = ParamSpace(params)``. No matrix is ever formed. One
module per curvature matrix:

* :mod:`natgrad.hessian`: :func:`hessian_operator` (``H v = ∇²L v``, double
  backprop by default), :func:`value_grad_hessian`, :func:`kl_hessian_operator`.
* :mod:`natgrad.ggn`: :func:`ggn_operator`, the generalized Gauss-Newton
  ``G v = Jᵀ H_out J v``.
* :mod:`natgrad.fisher`: :func:`fisher_operator`, the Fisher of a conditional
  distribution averaged over a batch of states (the KL Hessian of TRPO).
* :mod:`natgrad.gauss_newton`: the ``JᵀMJ`` core of the last two.
* :mod:`natgrad.batches`: curvature of a full-data mean, streamed batch by batch.
* :mod:`natgrad.guards`: the input/output checks every constructor runs.
"""

from natgrad.curvature_operator import CurvatureOperator
from natgrad.fisher import FAMILIES, fisher_operator
from natgrad.gauss_newton import LINEARIZATIONS
from natgrad.ggn import ggn_operator
from natgrad.hessian import (
    HESSIAN_METHODS,
    hessian_operator,
    kl_hessian_operator,
    value_grad_hessian,
)

__all__ = [
    "FAMILIES",
    "HESSIAN_METHODS",
    "LINEARIZATIONS",
    "CurvatureOperator",
    "fisher_operator",
    "ggn_operator",
    "hessian_operator",
    "kl_hessian_operator",
    "value_grad_hessian",
]
