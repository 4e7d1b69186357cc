"""Hessian-vector products of a scalar function, ``H v = ∇²L(θ) v``, matrix-free.

Two exact methods (``method=`` of :func:`hessian_operator`):

* ``"double_backprop"`` (reverse-over-reverse): the gradient ``g = ∇L`` is
  computed **once**, in the constructor, with ``create_graph=True``; each
  product backpropagates ``gᵀv`` through that kept graph,
  ``H v = ∇_θ(g(θ)ᵀ v)``, i.e. one backward of the backward and no forward.
  The constructor's forward and backward also give ``L`` and ``∇L``, which
  :func:`value_grad_hessian` returns. Memory: the forward activations and the
  gradient graph stay alive as long as the operator.
* ``"forward_over_reverse"``: ``H v = jvp(∇L, θ; v)`` with :mod:`torch.func`,
  which re-runs the forward and the backward with tangents at **every**
  product (nothing is kept between products). It needs no double-backward
  formula, only forward-mode derivatives of the backward.

``"auto"`` (default) is ``"double_backprop"``, falling back to
``"forward_over_reverse"`` when double backprop cannot be exact: the first
product fails because an op in the graph has no double-backward formula, or a
custom ``autograd.Function`` with a ``@once_differentiable`` backward left
``∇L`` constant (see :func:`_check_twice_differentiable`). Measured on CPU
(``bench/test_bench_curvature.py``, ``bench/natgrad_vs_peers.py``), double
backprop costs about one gradient per product, and a bit less than a
hand-written ``torch.autograd.grad`` HVP since the products call the autograd
engine directly (:mod:`natgrad.backprop`); forward-over-reverse costs several
gradients: it re-evaluates the loss under two torch.func transforms, whose
per-op Python dispatch dominates small problems, and its first use in a
process imports ``torch._dynamo`` for torch.func's decompositions (≈ 1.5 s).
There is no ``torch.func.linearize`` method: the kept gradient graph of
double backprop *is* the cached linearisation of ``∇L``, without the tracing
cost, and ``linearize(grad(F.mse_loss))`` crashes the process in torch 2.13.

With ``data=`` (an iterable of batches) the operator is the Hessian of the
full-data mean, streamed batch by batch (:mod:`natgrad.batches`): each product
rebuilds each batch's gradient graph, one pass over the data per product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp

from natgrad.backprop import vjp
from natgrad.batches import one_batch_or_streamed
from natgrad.curvature_operator import CurvatureOperator, zero_operator
from natgrad.guards import (
    check_args,
    check_modules,
    no_dependence_error,
    translated_errors,
)
from natgrad.params import ParamSpace, detached_params

__all__ = [
    "HESSIAN_METHODS",
    "hessian_operator",
    "kl_hessian_operator",
    "value_grad_hessian",
]

#: Values of ``method`` in :func:`hessian_operator`.
HESSIAN_METHODS = ("auto", "double_backprop", "forward_over_reverse")

Params = Mapping[str, Tensor]
Loss = Callable[[dict[str, Tensor]], Tensor]


def _scalar(out: Any, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} must return a scalar torch tensor, got {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor, got shape {tuple(out.shape)}")
    return out.reshape(())


def _flat(parts: tuple[Tensor | None, ...], like: list[Tensor]) -> Tensor:
    """Concatenate per-leaf results (``None``: the leaf is unused, zeros)."""
    flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(parts, like)]
    # One leaf: a view, no copy (the common case of a function of one tensor).
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def _gradient_graph(
    loss: Loss, space: ParamSpace, primals: dict[str, Tensor], what: str
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(L, ∇L, leaves)``: ``∇L`` flat, with its graph (``create_graph=True``).

    Raises:
        ValueError: ``L`` is not a scalar or does not depend on the leaves.
        TypeError: ``L`` is not a tensor, or numpy conversion inside ``loss``.
    """
    leaves = [p.detach().requires_grad_(True) for p in primals.values()]
    # enable_grad: the graph must be built even when the caller runs under no_grad.
    with torch.enable_grad(), translated_errors(what):
        value = _scalar(loss(dict(zip(space.names, leaves))), what)
        if not value.requires_grad:
            raise no_dependence_error(what)
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):  # e.g. model(x) using its own nn.Parameters
            raise no_dependence_error(what)
        return value, _flat(grads, leaves), leaves


def _double_backprop(
    loss: Loss, space: ParamSpace, primals: dict[str, Tensor], what: str
) -> tuple[Tensor, Tensor, CurvatureOperator]:
    """``(L, ∇L, H)`` from one forward and one ``create_graph`` backward; see the module doc."""
    value, g, leaves = _gradient_graph(loss, space, primals, what)
    _check_twice_differentiable(value, g, what)
    if not g.requires_grad:
        # L is at most linear in θ: H = 0 (a legitimate answer, unlike a constant L).
        return value.detach(), g, zero_operator(space)
    numels = [p.numel() for p in leaves]
    if len(leaves) == 1:
        # One tensor (the common case of a function of a vector): no concatenation.
        # vjp: the engine without torch.autograd.grad's per-call checks (natgrad.backprop).
        leaf = leaves[0]

        def matvec(v: Tensor) -> Tensor:
            # vjp keeps the gradient graph: it serves every product (by design).
            hv = vjp((g,), (leaf,), (v,))[0]
            # None: g requires grad only through other tensors (L linear in the leaf).
            return hv.reshape(-1) if hv is not None else torch.zeros_like(v)

    else:

        def matvec(v: Tensor) -> Tensor:
            return _flat(vjp((g,), leaves, (v,)), leaves)

    def matmat(V: Tensor) -> Tensor:
        k = V.shape[1]
        if k == 0:
            return torch.zeros_like(V)
        try:
            parts = torch.autograd.grad(
                g, leaves, V.T, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:
            # An op without a batching rule for autograd's batched backward: loop.
            return torch.stack([matvec(V[:, j]) for j in range(k)], dim=1)
        blocks = [
            (p.reshape(k, -1) if p is not None else V.new_zeros(k, m))
            for p, m in zip(parts, numels)
        ]
        return torch.cat(blocks, dim=1).T

    return value.detach(), g.detach(), CurvatureOperator(matvec, space, matmat=matmat)


def _graph_nodes(out: Tensor) -> Iterator[Any]:
    """Every autograd node in the graph of ``out``."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


class _OnceDifferentiableError(ValueError):
    """A once-differentiable backward in the graph; ``recoverable``: forward-over-reverse works."""

    def __init__(self, message: str, recoverable: bool) -> None:
        super().__init__(message)
        self.recoverable = recoverable


def _check_twice_differentiable(value: Tensor, g: Tensor, what: str) -> None:
    """Refuse a gradient graph that silently drops a once-differentiable backward.

    A custom ``autograd.Function`` whose backward is ``@once_differentiable`` runs
    that backward without a graph. Two cases, both detected here by walking the
    graph once per construction:

    * its incoming gradient is constant: its contribution to ``∇L`` is then
      constant, ``∇L`` may not require grad at all and ``H`` would be 0.
      Forward-over-reverse is exact here (given the Function's ``jvp``), and
      ``method="auto"`` switches to it;
    * its incoming gradient depends on ``θ``: torch routes the contribution
      through an ``Error`` node, which it prunes, without raising, when
      differentiating with respect to the parameters only, and torch.func drops
      the tangent in the same place: no method is exact, so this always raises.

    Raises:
        _OnceDifferentiableError: (a ``ValueError``) such a Function is in the graph.
    """
    if g.requires_grad:
        if any(node.name() == "torch::autograd::Error" for node in _graph_nodes(g)):
            raise _OnceDifferentiableError(
                f"{what} uses a custom autograd Function whose backward is not twice "
                "differentiable (@once_differentiable) on a gradient that depends on θ: torch "
                "silently drops its second-order term in every HVP method. Give the Function "
                "a differentiable backward (remove @once_differentiable)",
                recoverable=False,
            )
        return
    names = {
        type(node).__name__.removesuffix("Backward")
        for node in _graph_nodes(value)
        if isinstance(node, torch.autograd.function.BackwardCFunction)
    }
    if names:
        raise _OnceDifferentiableError(
            f"{what} uses the custom autograd Function(s) {sorted(names)}, whose backward may "
            "not be twice differentiable (@once_differentiable), so double backprop may give "
            "H = 0 wrongly: use method='forward_over_reverse' (needs the Function's jvp), or "
            "give the Function a differentiable backward",
            recoverable=True,
        )


def _forward_over_reverse(
    loss: Loss, space: ParamSpace, primals: dict[str, Tensor], what: str
) -> CurvatureOperator:
    """``H v = jvp(grad L)(v)``; nothing is kept between products (see the module doc)."""
    # One forward and backward at construction, so that a bad loss fails here, not in
    # CG, and a once-differentiable backward that no method can handle is refused.
    value, g, _ = _gradient_graph(loss, space, primals, what)
    try:
        _check_twice_differentiable(value, g, what)
    except _OnceDifferentiableError as e:
        if not e.recoverable:  # the recoverable case is the one this method handles
            raise
    del value, g
    grad_fn = grad(lambda p: _scalar(loss(p), what))
    unravel, ravel = space.unravel, space.ravel
    fallback: list[CurvatureOperator] = []

    def matvec(v: Tensor) -> Tensor:
        if not fallback:
            try:
                return ravel(jvp(grad_fn, (primals,), (unravel(v),))[1])
            except RuntimeError as e:
                # Some backward formulas have no forward-mode derivative usable under jvp
                # (torch 2.13: F.mse_loss raises "ZeroTensors are immutable"): use double
                # backprop, exact too, from then on.
                if "ZeroTensor" not in str(e):
                    raise
                fallback.append(_double_backprop(loss, space, primals, what)[2])
        return fallback[0].matvec(v)

    return CurvatureOperator(matvec, space)


def _auto(
    loss: Loss, space: ParamSpace, primals: dict[str, Tensor], what: str
) -> CurvatureOperator:
    """Double backprop; forward-over-reverse when double backprop cannot run.

    That is: its construction finds a custom Function that left ``∇L``
    constant (see :func:`_double_backprop`), or its first product fails (an op
    without a double-backward formula). The first product then installs the
    chosen method's own closures in the returned operator, so later products pay
    no extra dispatch.
    """
    try:
        primary = _double_backprop(loss, space, primals, what)[2]
    except _OnceDifferentiableError as e:
        if not e.recoverable:
            raise
        return _forward_over_reverse(loss, space, primals, what)

    def first(v: Tensor) -> Tensor:
        try:
            out, chosen = primary.matvec(v), primary
        except RuntimeError as e:
            try:
                chosen = _forward_over_reverse(loss, space, primals, what)
                out = chosen.matvec(v)
            except RuntimeError:
                raise e from None
        op._matvec, op._matmat = chosen._matvec, chosen._matmat
        return out

    op = CurvatureOperator(first, space, matmat=first)
    return op


_METHODS = {
    "auto": _auto,
    "double_backprop": lambda *a: _double_backprop(*a)[2],
    "forward_over_reverse": _forward_over_reverse,
}


def _batch_hessian(
    loss_fn: Callable[..., Tensor],
    space: ParamSpace,
    primals: dict[str, Tensor],
    args: tuple,
    method: str,
) -> CurvatureOperator:
    check_args(args, space.dtype)
    return _METHODS[method](lambda p: loss_fn(p, *args), space, primals, "loss_fn")


def hessian_operator(
    loss_fn: Callable[..., Tensor],
    params: Params | Tensor,
    *args: Any,
    method: str = "auto",
    data: Iterable[Any] | None = None,
) -> CurvatureOperator:
    """Hessian of a scalar loss, ``H v = ∇²_θ L(θ) v``, matrix-free and exact.

    Args:
        loss_fn: ``loss_fn(params_dict, *args) -> scalar`` (a batch mean when
            ``data`` is given).
        params: Mapping name -> tensor, the point ``θ``; or one tensor ``x`` (any
            shape), in which case ``loss_fn(x, *args)`` and the operator acts on
            ``x.reshape(-1)``.
        *args: One batch: further (fixed) arguments of ``loss_fn``.
        method: ``"auto"`` (default), ``"double_backprop"`` or
            ``"forward_over_reverse"``; see the module docstring for the cost of each
            and when ``"auto"`` falls back.
        data: Instead of ``*args``, a re-iterable of batches (a list of tuples, a
            DataLoader): the Hessian of the full-data mean ``Σ_b (n_b/N) L_b``,
            one pass over the data per product (:mod:`natgrad.batches`).

    Returns:
        A symmetric ``(n, n)`` :class:`CurvatureOperator`.

    Raises:
        ValueError: Unknown ``method``; both ``*args`` and ``data``; ``params`` is
            not a valid parameter mapping; ``loss_fn`` does not return a scalar or
            does not depend on ``params``; a train-mode BatchNorm/Dropout.
        TypeError: ``loss_fn`` returns a non-tensor or converts to numpy; data of
            another floating dtype than ``params``; ``data`` is not re-iterable.
    """
    if method not in HESSIAN_METHODS:
        raise ValueError(f"method must be one of {HESSIAN_METHODS}, got {method!r}")
    if isinstance(params, Tensor):
        return _tensor_hessian(loss_fn, params, args, method, data)
    space, primals = detached_params(params)
    check_modules(loss_fn, "loss_fn")
    return one_batch_or_streamed(
        space, args, data, lambda batch: _batch_hessian(loss_fn, space, primals, batch, method)
    )


def _tensor_hessian(
    loss_fn: Callable[..., Tensor],
    x: Tensor,
    args: tuple,
    method: str,
    data: Iterable[Any] | None,
) -> CurvatureOperator:
    """``hessian_operator`` of a function of one tensor: the same operator on ``{"x": x}``."""

    def loss(p: dict[str, Tensor], *batch: Any) -> Tensor:
        return loss_fn(p["x"], *batch)

    return hessian_operator(loss, {"x": x}, *args, method=method, data=data)


def value_grad_hessian(
    fun: Callable[..., Tensor], x: Tensor | Params, *args: Any
) -> tuple[Tensor, Tensor, CurvatureOperator]:
    """Value, gradient and Hessian operator of ``fun`` at ``x`` from one forward and one backward.

    The same code as ``hessian_operator(method="double_backprop")``: ``∇fun`` is
    computed with ``create_graph=True`` and its graph kept for the products
    ``H v = ∇(∇fun(x)ᵀ v)``, so a Newton step pays one forward and one backward
    for ``(f, g)`` and one double backward per Hessian product.

    Args:
        fun: ``fun(x, *args) -> scalar tensor``.
        x: A tensor (any shape) or a mapping name -> tensor (one dtype/device).
        *args: Further (fixed) arguments of ``fun``.

    Returns:
        ``(f, g, H)``: the 0-dim value (detached), the flat ``(n,)`` gradient
        (detached; ``x.reshape(-1)``'s order for a tensor, ``H.space``'s for a
        mapping) and the ``(n, n)`` :class:`CurvatureOperator` on flat vectors.

    Raises:
        TypeError: ``x`` is neither a tensor nor a mapping of tensors, ``fun``
            returns a non-tensor, or ``args`` hold data of another floating dtype.
        ValueError: ``fun`` does not return a scalar or does not depend on ``x``.
    """
    if isinstance(x, Tensor):
        space, primals = detached_params({"x": x})

        def loss(p: dict[str, Tensor]) -> Tensor:
            return fun(p["x"], *args)

    elif isinstance(x, Mapping):
        space, primals = detached_params(x)

        def loss(p: dict[str, Tensor]) -> Tensor:
            return fun(p, *args)

    else:
        raise TypeError(f"x must be a tensor or a mapping name -> tensor, got {type(x).__name__}")
    check_args(args, space.dtype)
    return _double_backprop(loss, space, primals, "fun")


def kl_hessian_operator(
    kl_fn: Callable[..., Tensor], params: Params, *args: Any
) -> CurvatureOperator:
    """Hessian of a scalar (mean KL) by double backprop: ``H v = ∇_θ(∇_θ KL · v)``.

    The seed notes' ``compute_hvp`` (and SB3 TRPO's ``hessian_vector_product``);
    the same code as ``hessian_operator(kl_fn, params, *args,
    method="double_backprop")``. It is the reference :func:`fisher_operator` is
    tested and benchmarked against.

    Args:
        kl_fn: ``kl_fn(params_dict, *args) -> scalar``, normally the mean
            ``KL(π_old ‖ π_θ)`` with the old distribution held fixed (detached).
        params: Mapping name -> tensor, the point ``θ`` (normally ``θ_old``).
        *args: Further (fixed) arguments of ``kl_fn``.

    Returns:
        A symmetric ``(n, n)`` :class:`CurvatureOperator`.

    Raises:
        ValueError: ``kl_fn`` does not return a scalar or ignores ``params``.
    """
    return hessian_operator(kl_fn, params, *args, method="double_backprop")
