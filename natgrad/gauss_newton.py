"""The Gauss-Newton core shared by the GGN and the Fisher: ``v -> Jᵀ M J v``.

``J = ∂z/∂θ`` is the Jacobian of the outputs ``z = fn(θ)`` of a model (or of a
conditional distribution's parameters) and ``M`` a curvature in output space
(the loss Hessian ``∇²_z ℓ`` for the GGN, the closed-form Fisher for the
Fisher). :func:`linearized` computes ``z`` and the products ``v -> J v`` and
``u -> Jᵀ u`` once; :func:`gauss_newton_operator` chains them.

Caching (the linearisation is computed once, in the constructor): the outputs
``z`` and the reverse-mode ``vjp_fn`` (``u -> Jᵀu``) are stored, and ``J v`` is
obtained as the transpose of that stored linear map (the ``vjp`` of ``vjp_fn``,
which is linear in ``u``), so a matvec never re-runs the forward pass. Measured
with ``bench/fvp_timing.py`` (17-64-64-6 tanh Gaussian policy, B = 25,000,
float32, 2 CPU threads, quiet machine), median per matvec and per set-up in
units of one surrogate gradient (≈ 24 ms):

=================================  ==========  ===========================
method                             matvec      set-up
=================================  ==========  ===========================
``"transpose"`` (default)          ≈ 0.85      ≈ 0.9
``"linearize"``                    ≈ 0.9-1.0   ≈ 8 (``make_fx`` tracing)
``"jvp"`` (re-runs the forward)    ≈ 1.5       ≈ 0.5
kl_hessian_operator (double bp)    ≈ 1.4       ≈ 1.0
=================================  ==========  ===========================

``"transpose"`` and ``"linearize"`` run the same kernels per matvec (10 ``mm``,
4 ``tanh_backward`` on that network), but ``torch.func.linearize`` pays ~0.2 s
of Python tracing per set-up, i.e. more than a whole CG solve saves. (A
hand-fused MLP FVP with in-place ops reaches ≈ 0.6×: the remaining gap is the
out-of-place adds and allocations of the generic autograd kernels.) Functions
using an op without a double-backward formula need ``"linearize"`` or ``"jvp"``.

``linearization="custom"``: the model function supplies its own products, as a
method ``model_fn.linearize(params, *args) -> (outputs, jvp_fn, vjp_fn)`` with
``jvp_fn(v) = J v`` (``v`` a dict like ``params``, result structured like
``outputs``) and ``vjp_fn(u) = Jᵀ u`` (a dict like ``params``). Hand-written
products for a known architecture skip the autograd engine and its
bookkeeping: for a tanh MLP they are the same 10 ``mm`` and ~1.5× faster per
matvec on CPU (``natgrad.mlp`` does this for any plain MLP, the TRPO policies included).

The checks of :mod:`natgrad.guards` run here for both operators: non-tensor
outputs, outputs independent of ``θ``, numpy conversion and in-place mutation
inside the function (all at construction).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from natgrad.backprop import vjp
from natgrad.batches import one_batch_or_streamed
from natgrad.curvature_operator import CurvatureOperator
from natgrad.guards import (
    check_args,
    check_dependence,
    check_modules,
    no_dependence_error,
    tracked_outputs,
    translated_errors,
)
from natgrad.params import ParamSpace, detached_params

__all__ = [
    "LINEARIZATIONS",
    "categorical_fisher",
    "check_linearization",
    "custom_linearize",
    "gauss_newton_curvature",
    "gauss_newton_operator",
    "linearized",
    "tree_map",
]

#: Ways to apply ``J`` in :func:`~natgrad.ggn_operator` / :func:`~natgrad.fisher_operator`
#: (plus ``"custom"`` for functions with their own ``linearize`` method, see above).
LINEARIZATIONS = ("transpose", "linearize", "jvp")

TreeFn = Callable[[Any], Any]
Custom = Callable[[dict[str, Tensor]], tuple[Any, TreeFn, TreeFn]]


def tree_map(f: Callable[[Tensor], Tensor], tree: Any) -> Any:
    return torch.utils._pytree.tree_map(f, tree)


def check_linearization(linearization: str) -> None:
    if linearization != "custom" and linearization not in LINEARIZATIONS:
        raise ValueError(
            f"linearization must be one of {LINEARIZATIONS} or 'custom', got {linearization!r}"
        )


def custom_linearize(fn: Any, args: tuple) -> Custom | None:
    """``params -> fn.linearize(params, *args)`` when ``fn`` has that method."""
    method = getattr(fn, "linearize", None)
    if not callable(method):
        return None
    return lambda primals: method(primals, *args)


def linearized(
    fn: TreeFn,
    primals: dict[str, Tensor],
    linearization: str,
    custom: Custom | None,
    what: str,
) -> tuple[Any, TreeFn, TreeFn]:
    """Outputs ``z = fn(θ)`` (detached), ``v -> J v`` and ``u -> Jᵀ u``, computed once.

    See the module docstring for the trade-offs of ``linearization``.

    Raises:
        ValueError: Unknown ``linearization``, ``"custom"`` without ``custom``,
            outputs independent of ``θ``, or in-place mutation inside ``fn``.
        TypeError: Non-tensor outputs, or numpy conversion inside ``fn``.
    """
    check_linearization(linearization)
    if linearization == "custom":
        if custom is None:
            raise ValueError(
                "linearization='custom' needs a model/dist function with a method "
                "linearize(params, *args) -> (outputs, jvp_fn, vjp_fn)"
            )
        outputs, jvp_fn, vjp_fn = custom(primals)
        return tree_map(torch.Tensor.detach, outputs), jvp_fn, vjp_fn
    if linearization == "transpose":
        return _transpose_linearization(fn, primals, what)
    # torch.func sees a module's own nn.Parameters as dependent too: check on a
    # plain autograd forward (one more forward and backward, for these opt-in methods).
    _forward(fn, primals, what)
    with translated_errors(what):
        outputs, vjp_fn = torch.func.vjp(fn, primals)
    if linearization == "linearize":
        with warnings.catch_warnings(), translated_errors(what):
            warnings.simplefilter("ignore", UserWarning)
            _, jvp_fn = torch.func.linearize(fn, primals)
    else:

        def jvp_fn(v: dict[str, Tensor]) -> Any:
            return torch.func.jvp(fn, (primals,), (v,))[1]

    def vjp_only(u: Any) -> dict[str, Tensor]:
        return vjp_fn(u)[0]

    return tree_map(torch.Tensor.detach, outputs), jvp_fn, vjp_only


def _forward(
    fn: TreeFn, primals: dict[str, Tensor], what: str, check: bool = True
) -> tuple[Any, list[Tensor]]:
    """``fn`` on fresh leaves requiring grad, with the checks of :mod:`natgrad.guards`."""
    leaves = [p.detach().requires_grad_(True) for p in primals.values()]
    with torch.enable_grad(), translated_errors(what):
        outputs = tracked_outputs(fn, what)(dict(zip(primals, leaves)))
        if check:
            check_dependence(tree_leaves(outputs), leaves, what)
    return outputs, leaves


def _transpose_linearization(
    fn: TreeFn, primals: dict[str, Tensor], what: str
) -> tuple[Any, TreeFn, TreeFn]:
    """``"transpose"``: one forward with plain autograd; ``J`` as the transpose of ``Jᵀ``.

    ``Jᵀu`` backpropagates ``u`` through the kept forward graph. ``u -> Jᵀu`` is
    linear, so recording it once at a symbolic ``u₀`` (``create_graph``) and
    backpropagating ``v`` through that record gives ``(Jᵀ)ᵀ v = J v``: one
    backward-of-backward per product, no forward re-run, no tracing. Plain
    autograd rather than torch.func: the first torch.func transform in a process
    imports ``torch._dynamo`` (≈ 1.5 s), and the engine is called without
    ``torch.autograd.grad``'s per-call checks (:mod:`natgrad.backprop`).
    """
    names = list(primals)
    outputs, leaves = _forward(fn, primals, what, check=False)
    flat_out, spec = tree_flatten(outputs)
    # Outputs that do not depend on θ (a constant log σ) have J = 0: skipped.
    live = [i for i, z in enumerate(flat_out) if z.requires_grad]
    live_out = [flat_out[i] for i in live]
    with torch.enable_grad():
        u0 = [torch.zeros_like(z, requires_grad=True) for z in live_out]
        jt_u0 = vjp(live_out, leaves, u0, create_graph=True) if live else []
    if all(g is None for g in jt_u0):
        raise no_dependence_error(what)
    # Parameters whose Jᵀu₀ depends on u₀ (the others have J = 0 columns).
    recorded = [(n, g) for n, g in zip(names, jt_u0) if g is not None and g.requires_grad]

    def jvp_fn(v: dict[str, Tensor]) -> Any:
        parts: Any = [None] * len(u0)
        if recorded:
            parts = vjp([g for _, g in recorded], u0, [v[n] for n, _ in recorded])
        flat = [torch.zeros_like(z) for z in flat_out] if len(live) < len(flat_out) else flat_out[:]
        for i, jv, z in zip(live, parts, live_out):
            flat[i] = jv if jv is not None else torch.zeros_like(z)
        return tree_unflatten(flat, spec)

    def vjp_fn(u: Any) -> dict[str, Tensor]:
        flat_u = tree_leaves(u)
        parts = vjp(live_out, leaves, [flat_u[i] for i in live])
        return {
            n: (g if g is not None else torch.zeros_like(p))
            for n, g, p in zip(names, parts, leaves)
        }

    return tree_map(torch.Tensor.detach, outputs), jvp_fn, vjp_fn


def gauss_newton_operator(
    space: ParamSpace, apply_out: TreeFn, outputs: Any, j_fn: TreeFn, jt_fn: TreeFn
) -> CurvatureOperator:
    """``v -> Jᵀ apply_out(J v)`` on flat vectors; ``op.vjp(u) = Jᵀu``."""
    unravel, ravel = space.unravel, space.ravel

    def matvec(v: Tensor) -> Tensor:
        return ravel(jt_fn(apply_out(j_fn(unravel(v)))))

    def vjp(u: Any) -> Tensor:
        return ravel(jt_fn(u))

    return CurvatureOperator(matvec, space, outputs=outputs, vjp=vjp)


def gauss_newton_curvature(
    fn: Callable[..., Any],
    params: Mapping[str, Tensor],
    args: tuple,
    data: Iterable[Any] | None,
    linearization: str,
    output_curvature: Callable[[Any], TreeFn],
    what: str,
    args_name: str = "args",
) -> CurvatureOperator:
    """``Jᵀ M J`` of ``z = fn(θ, *batch)`` on one batch or streamed over ``data``.

    The shared body of :func:`~natgrad.ggn_operator` and :func:`~natgrad.fisher_operator`:
    the checks of :mod:`natgrad.guards`, the linearisation, and ``M =
    output_curvature(z)`` (a map ``t -> M t`` built from the detached outputs).
    """
    check_linearization(linearization)
    space, primals = detached_params(params)
    check_modules(fn, what)

    def build(batch: tuple) -> CurvatureOperator:
        check_args(batch, space.dtype, args_name)

        def call(p: dict[str, Tensor]) -> Any:
            return fn(p, *batch)

        custom = custom_linearize(fn, batch)
        outputs, j_fn, jt_fn = linearized(call, primals, linearization, custom, what)
        return gauss_newton_operator(space, output_curvature(outputs), outputs, j_fn, jt_fn)

    return one_batch_or_streamed(space, args, data, build)


def categorical_fisher(logits: Tensor, B: int) -> Callable[[Tensor], Tensor]:
    """``u -> (diag(p) − ppᵀ) u / B`` row-wise, ``p = softmax(logits)`` precomputed once.

    The Fisher of a categorical in its logits, and the Hessian in the logits of
    the batch-mean cross-entropy.
    """
    p = torch.softmax(logits, dim=-1)
    p_over_b = p / B

    def apply(u: Tensor) -> Tensor:
        # p ⊙ (u − <p, u>): two fused elementwise passes and one reduction.
        return p_over_b * (u - (p * u).sum(dim=-1, keepdim=True))

    return apply
