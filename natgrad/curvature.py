"""Matrix-free curvature operators on flat parameter vectors.

Every constructor takes a pure function of a parameter dict (written with
:func:`torch.func.functional_call`) and the dict ``params`` at which the
curvature is taken, and returns a :class:`CurvatureOperator`: a
:class:`~natgrad.linop.LinearOperator` of shape ``(n, n)`` on flat vectors
ordered as ``op.space = ParamSpace(params)``. No matrix is ever formed.

* :func:`hessian_operator`: ``H v = ∇²L v`` by forward-over-reverse
  (``jvp`` of ``grad``).
* :func:`ggn_operator`: the generalized Gauss-Newton ``G v = Jᵀ H_out J v``.
* :func:`fisher_operator`: the Fisher of a conditional distribution averaged
  over the batch of states, ``F v = (1/B) Σ_s J_sᵀ F_out(s) J_s v``, with the
  closed-form Fisher ``F_out`` of the output distribution. At ``θ = θ_old`` it is
  exactly the Hessian of the mean forward KL ``E_s[KL(π_old(·|s) ‖ π_θ(·|s))]``,
  the ``H`` of the TRPO constraint (seed notes: "H 是KL散度关于θ的海森矩阵 ... 就是
  费雪信息矩阵").
* :func:`kl_hessian_operator`: the same ``H`` by double backprop of the KL,
  ``H v = ∇_θ(∇_θ KL · v)`` (the seed notes' ``compute_hvp`` recipe, as in SB3);
  the reference the fast path is tested and benchmarked against.

Why ``JᵀF_outJ`` is the KL Hessian: with ``z = f_θ(s)`` the distribution
parameters, ``KL(π_old ‖ π_z)`` has zero gradient in ``z`` at ``z_old`` (it is
minimal there), so the chain rule's second term ``Σ ∂KL/∂z · ∇²z`` vanishes and
``∇²_θ KL = Jᵀ ∇²_z KL J = Jᵀ F_out J`` (the Hessian in ``z`` of the KL at its
minimum is the Fisher in ``z``).

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
matvec on CPU (``trpo.fast_fisher`` does this for the TRPO policies).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, linearize, vjp

from natgrad.linop import LinearOperator
from natgrad.params import ParamSpace

__all__ = [
    "CurvatureOperator",
    "FAMILIES",
    "LINEARIZATIONS",
    "ggn_operator",
    "fisher_operator",
    "hessian_operator",
    "kl_hessian_operator",
]

#: Output distribution families understood by :func:`fisher_operator`.
FAMILIES = ("categorical", "diag_gaussian", "multi_categorical", "bernoulli")
#: Ways to apply ``J`` in :func:`ggn_operator` / :func:`fisher_operator` (plus
#: ``"custom"`` for functions with their own ``linearize`` method, see above).
LINEARIZATIONS = ("transpose", "linearize", "jvp")

Params = Mapping[str, Tensor]
TreeFn = Callable[[Any], Any]


class CurvatureOperator(LinearOperator):
    """A square :class:`LinearOperator` on the flat parameters of ``space``.

    Attributes:
        space: The :class:`ParamSpace` giving the flat ordering.
        outputs: For :func:`ggn_operator` / :func:`fisher_operator`, the model
            outputs (distribution parameters) at ``params``, detached, so a
            caller can reuse them (e.g. for the old log-probabilities) without
            another forward pass; ``None`` for the Hessian operators.
        vjp: For :func:`ggn_operator` / :func:`fisher_operator`, the cached
            reverse-mode product ``u -> Jᵀu`` (``u`` structured like ``outputs``,
            result a flat ``(n,)`` vector); ``None`` for the Hessian operators.
            By the chain rule the gradient of any loss of the outputs is
            ``∇_θ ℓ(z(θ)) = Jᵀ ∇_z ℓ``, so ``op.vjp(grad_z)`` gives it from the
            linearisation already computed, one backward and no forward pass.
    """

    __slots__ = ("space", "outputs", "vjp")

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        space: ParamSpace,
        *,
        matmat: Callable[[Tensor], Tensor] | None = None,
        outputs: Any = None,
        vjp: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__(
            matvec, (space.numel, space.numel), space.dtype, space.device, matmat=matmat
        )
        self.space = space
        self.outputs = outputs
        self.vjp = vjp


def _detached(params: Params) -> tuple[ParamSpace, dict[str, Tensor]]:
    space = ParamSpace(params)
    return space, {k: v.detach() for k, v in params.items()}


# --------------------------------------------------------------------------- Hessian
def hessian_operator(
    loss_fn: Callable[..., Tensor], params: Params, *args: Any, cache: bool = False
) -> CurvatureOperator:
    """Hessian of a scalar loss, ``H v = ∇²_θ L(θ) v``, matrix-free.

    Forward-over-reverse: ``H v = jvp(grad L, (θ,), (v,))`` (one forward, one
    backward and their tangents per matvec; no double backprop).

    Args:
        loss_fn: ``loss_fn(params_dict, *args) -> scalar``.
        params: Mapping name -> tensor, the point ``θ``.
        *args: Further (fixed) arguments of ``loss_fn``.
        cache: If True, ``torch.func.linearize`` the gradient once: each matvec
            then only runs the tangent kernels (measured ≈ 0.4× vs ≈ 0.9× a
            gradient on an MLP at batch 25,000) but the set-up traces the graph
            (~0.1-0.3 s of Python), so it pays off only for many matvecs.

    Returns:
        A symmetric ``(n, n)`` :class:`CurvatureOperator`.

    Raises:
        ValueError: ``params`` is not a valid parameter mapping, or ``loss_fn``
            does not return a scalar (found at the first matvec: without
            ``cache`` nothing is evaluated in the constructor).
    """
    space, primals = _detached(params)

    def loss(p: dict[str, Tensor]) -> Tensor:
        out = loss_fn(p, *args)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        return out.reshape(())

    grad_fn = grad(loss)
    unravel, ravel = space.unravel, space.ravel
    if cache:
        with warnings.catch_warnings():
            # const_fold inside linearize warns about its own get_attr nodes.
            warnings.simplefilter("ignore", UserWarning)
            _, hvp_fn = linearize(grad_fn, primals)

        def matvec(v: Tensor) -> Tensor:
            return ravel(hvp_fn(unravel(v)))

    else:
        # Some losses' backward formulas have no forward-mode derivative that works under
        # jvp (torch 2.13: F.mse_loss raises "ZeroTensors are immutable"). For those the
        # operator falls back, once, to reverse-over-reverse: H v = vjp(grad L)(v), exact
        # too since H is symmetric, at the cost of a second reverse pass.
        reverse: list[Any] = []

        def matvec(v: Tensor) -> Tensor:
            if not reverse:
                try:
                    return ravel(jvp(grad_fn, (primals,), (unravel(v),))[1])
                except RuntimeError as e:
                    if "ZeroTensor" not in str(e):
                        raise
                    reverse.append(vjp(grad_fn, primals)[1])
            return ravel(reverse[0](unravel(v))[0])

    return CurvatureOperator(matvec, space)


# ------------------------------------------------------------------ Gauss-Newton core
def _linearized(
    fn: TreeFn,
    primals: dict[str, Tensor],
    linearization: str,
    custom: Callable[[dict[str, Tensor]], tuple[Any, TreeFn, TreeFn]] | None = None,
) -> tuple[Any, TreeFn, TreeFn]:
    """Outputs ``z = fn(θ)``, ``v -> J v`` and ``u -> Jᵀ u``, computed once.

    See the module docstring for the measured trade-offs of ``linearization``.
    """
    if linearization == "custom":
        if custom is None:
            raise ValueError(
                "linearization='custom' needs a model/dist function with a method "
                "linearize(params, *args) -> (outputs, jvp_fn, vjp_fn)"
            )
        outputs, jvp_fn, vjp_fn = custom(primals)
        return _tree_map(torch.Tensor.detach, outputs), jvp_fn, vjp_fn
    if linearization not in LINEARIZATIONS:
        raise ValueError(
            f"linearization must be one of {LINEARIZATIONS} or 'custom', got {linearization!r}"
        )
    outputs, vjp_fn = vjp(fn, primals)
    if linearization == "transpose":
        # vjp_fn is linear in its cotangent u, so its own vjp (taken at any u,
        # here u = 0) is the transpose of Jᵀ, i.e. J: one backward-of-backward
        # per matvec, no forward re-run, no tracing.
        zeros = _tree_map(torch.zeros_like, outputs)
        _, jt_fn = vjp(vjp_fn, zeros)

        def jvp_fn(v: dict[str, Tensor]) -> Any:
            return jt_fn((v,))[0]

    elif linearization == "linearize":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, jvp_fn = linearize(fn, primals)
    else:

        def jvp_fn(v: dict[str, Tensor]) -> Any:
            return jvp(fn, (primals,), (v,))[1]

    def vjp_only(u: Any) -> dict[str, Tensor]:
        return vjp_fn(u)[0]

    return _tree_map(torch.Tensor.detach, outputs), jvp_fn, vjp_only


def _custom(fn: Any, args: tuple) -> Callable[[dict[str, Tensor]], Any] | None:
    """``params -> fn.linearize(params, *args)`` when ``fn`` has that method."""
    method = getattr(fn, "linearize", None)
    if not callable(method):
        return None
    return lambda primals: method(primals, *args)


def _tree_map(f: Callable[[Tensor], Tensor], tree: Any) -> Any:
    return torch.utils._pytree.tree_map(f, tree)


def _gauss_newton_operator(
    space: ParamSpace, apply_out: TreeFn, outputs: Any, j_fn: TreeFn, jt_fn: TreeFn
) -> CurvatureOperator:
    """``v -> Jᵀ apply_out(J v)`` on flat vectors."""
    unravel, ravel = space.unravel, space.ravel

    def matvec(v: Tensor) -> Tensor:
        return ravel(jt_fn(apply_out(j_fn(unravel(v)))))

    def vjp(u: Any) -> Tensor:
        return ravel(jt_fn(u))

    return CurvatureOperator(matvec, space, outputs=outputs, vjp=vjp)


# ----------------------------------------------------------------------------- GGN
def ggn_operator(
    model_fn: Callable[..., Any],
    params: Params,
    *args: Any,
    output_hessian: str | Callable[[Any, Any], Any] = "mse",
    linearization: str = "transpose",
) -> CurvatureOperator:
    """Generalized Gauss-Newton ``G v = Jᵀ H_out J v`` of ``loss(model_fn(θ))``.

    ``J = ∂z/∂θ`` is the Jacobian of the model outputs ``z = model_fn(θ, *args)``
    and ``H_out = ∇²_z loss`` the Hessian of the loss in the outputs:

    * ``"mse"``: ``loss = torch.nn.functional.mse_loss(z, y)`` (mean over **all**
      ``N = z.numel()`` elements), so ``H_out = (2 / N) I``.
    * ``"cross_entropy"``: ``loss = torch.nn.functional.cross_entropy(z, y)`` for
      logits ``z`` of shape ``(B, K)`` (mean over the batch), so ``H_out`` is
      block diagonal with blocks ``(diag(p_b) − p_b p_bᵀ) / B``, ``p_b = softmax(z_b)``.
    * a callable ``output_hessian(z, t) -> H_out t``: ``z`` the (detached) outputs,
      ``t = J v`` a tangent of the same structure (a tensor or a pytree of
      tensors); it must return ``H_out t`` with the structure of ``z`` and include
      any batch reduction (e.g. ``1/B``) itself. It must be linear in ``t``.

    Neither depends on the targets ``y``, so none are passed.

    Args:
        model_fn: ``model_fn(params_dict, *args) -> z``.
        params: Mapping name -> tensor, the point ``θ``.
        *args: Further (fixed) arguments of ``model_fn`` (e.g. the inputs).
        output_hessian: ``"mse"``, ``"cross_entropy"`` or a callable, see above.
        linearization: How ``J`` is applied: ``"transpose"`` (default),
            ``"linearize"``, ``"jvp"`` or ``"custom"`` (``model_fn.linearize``; see
            the module docstring).

    Returns:
        A symmetric positive semi-definite (for convex losses) ``(n, n)``
        :class:`CurvatureOperator`; ``op.outputs`` holds ``z``.

    Raises:
        ValueError: Unknown ``output_hessian`` or ``linearization``, or outputs
            of the wrong type/shape for the chosen ``output_hessian``.
    """
    space, primals = _detached(params)

    def fn(p: dict[str, Tensor]) -> Any:
        return model_fn(p, *args)

    if isinstance(output_hessian, str) and output_hessian not in ("mse", "cross_entropy"):
        raise ValueError(
            "output_hessian must be 'mse', 'cross_entropy' or a callable (z, t) -> H_out t, "
            f"got {output_hessian!r}"
        )
    if not (isinstance(output_hessian, str) or callable(output_hessian)):
        raise ValueError(f"output_hessian must be a string or a callable, got {output_hessian!r}")
    outputs, j_fn, jt_fn = _linearized(fn, primals, linearization, _custom(model_fn, args))

    if output_hessian == "mse":
        z = _single_tensor(outputs, "model_fn output for output_hessian='mse'")
        scale = 2.0 / max(z.numel(), 1)

        def apply_out(t: Tensor) -> Tensor:
            return t * scale

    elif output_hessian == "cross_entropy":
        z = _single_tensor(outputs, "model_fn output for output_hessian='cross_entropy'")
        if z.ndim != 2 or z.shape[0] == 0:
            raise ValueError(
                f"model_fn must return logits of shape (B, K) with B >= 1 for "
                f"output_hessian='cross_entropy', got {tuple(z.shape)}"
            )
        apply_out = _categorical_fisher(z, z.shape[0])
    else:
        user_fn = output_hessian

        def apply_out(t: Any) -> Any:
            return user_fn(outputs, t)

    return _gauss_newton_operator(space, apply_out, outputs, j_fn, jt_fn)


# ---------------------------------------------------------------------------- Fisher
def fisher_operator(
    dist_fn: Callable[..., Any],
    params: Params,
    *args: Any,
    family: str,
    linearization: str = "transpose",
) -> CurvatureOperator:
    """Fisher of a conditional distribution, averaged over a batch of states.

    ``F v = (1/B) Σ_s J_sᵀ F_out(s) J_s v`` where ``z_s = dist_fn(θ, *args)[s]`` are
    the distribution parameters for state ``s``, ``J_s = ∂z_s/∂θ`` and ``F_out`` the
    closed-form Fisher of the family in the parametrisation ``z``:

    * ``"categorical"``: ``z`` = logits ``(B, K)``; ``F_out = diag(p) − ppᵀ``,
      ``p = softmax(z)``.
    * ``"diag_gaussian"``: ``z = (mean, log_std)``, ``mean`` of shape ``(B, *event)``
      and ``log_std`` broadcastable to it (state-dependent ``(B, *event)`` or a shared
      parameter such as ``(d,)``); ``F_out = diag(1/σ²)`` on the mean and ``2`` on each
      ``log σ``. A shared ``log_std`` is counted once per state (its tangent is
      scaled by the broadcast multiplicity), so the batch mean stays exact.
    * ``"multi_categorical"``: ``z`` = a list/tuple of logits ``(B, K_i)``, one per
      independent sub-action; ``F_out`` is block diagonal in the sub-actions.
    * ``"bernoulli"``: ``z`` = logits ``(B, *event)`` of independent Bernoullis;
      ``F_out = diag(p(1 − p))``, ``p = sigmoid(z)``.

    At ``θ = θ_old`` this equals the Hessian of the mean forward KL
    ``E_s[KL(π_old(·|s) ‖ π_θ(·|s))]`` (see the module docstring), at the cost of
    about one gradient per matvec and no double backprop. The outputs, ``p`` (or
    ``1/σ²``) and the linearisation are computed once here, so CG iterations only
    run the ``J`` / ``Jᵀ`` kernels.

    Args:
        dist_fn: ``dist_fn(params_dict, *args) -> z`` as described per family.
        params: Mapping name -> tensor, the point ``θ`` (normally ``θ_old``).
        *args: Further (fixed) arguments of ``dist_fn`` (e.g. the observations).
        family: One of :data:`FAMILIES`.
        linearization: How ``J`` is applied: ``"transpose"`` (default, fastest
            generic), ``"linearize"``, ``"jvp"`` or ``"custom"`` (``dist_fn.linearize``,
            hand-written products; see the module docstring).

    Returns:
        A symmetric positive semi-definite ``(n, n)`` :class:`CurvatureOperator`;
        ``op.outputs`` holds the detached distribution parameters ``z``.

    Raises:
        ValueError: Unknown ``family`` or ``linearization``, or ``dist_fn``'s
            outputs do not have the structure/shapes the family requires.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    space, primals = _detached(params)

    def fn(p: dict[str, Tensor]) -> Any:
        return dist_fn(p, *args)

    outputs, j_fn, jt_fn = _linearized(fn, primals, linearization, _custom(dist_fn, args))
    apply_out = _FAMILY_FISHERS[family](outputs)
    return _gauss_newton_operator(space, apply_out, outputs, j_fn, jt_fn)


def _like(z: list | tuple, items: list[Tensor]) -> list | tuple:
    """``items`` in the container type of ``z`` (list, tuple or NamedTuple), as vjp needs."""
    if isinstance(z, list):
        return items
    return type(z)(*items) if hasattr(z, "_fields") else type(z)(items)


def _single_tensor(z: Any, what: str) -> Tensor:
    if not isinstance(z, Tensor):
        raise ValueError(f"{what} must be a single tensor, got {type(z).__name__}")
    return z


def _batch_size(z: Tensor, what: str) -> int:
    if z.ndim < 1 or z.shape[0] == 0:
        raise ValueError(f"{what} must have a leading batch dimension B >= 1, got {tuple(z.shape)}")
    return z.shape[0]


def _categorical_fisher(logits: Tensor, B: int) -> Callable[[Tensor], Tensor]:
    """``u -> (diag(p) − ppᵀ) u / B`` row-wise, ``p`` precomputed once."""
    p = torch.softmax(logits, dim=-1)
    p_over_b = p / B

    def apply(u: Tensor) -> Tensor:
        # p ⊙ (u − <p, u>): two fused elementwise passes and one reduction.
        return p_over_b * (u - (p * u).sum(dim=-1, keepdim=True))

    return apply


def _fisher_categorical(z: Any) -> Callable[[Tensor], Tensor]:
    z = _single_tensor(z, "dist_fn output for family='categorical'")
    if z.ndim != 2:
        raise ValueError(
            f"dist_fn must return logits of shape (B, K) for family='categorical', got {tuple(z.shape)}"
        )
    return _categorical_fisher(z, _batch_size(z, "categorical logits"))


def _fisher_multi_categorical(z: Any) -> Callable[[Any], Any]:
    if not isinstance(z, (list, tuple)) or len(z) == 0:
        raise ValueError(
            "dist_fn must return a non-empty list/tuple of logits (B, K_i) for "
            f"family='multi_categorical', got {type(z).__name__}"
        )
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in z]
    if (
        not all(isinstance(t, Tensor) and t.ndim == 2 for t in z)
        or len({t.shape[0] for t in z}) != 1
    ):
        raise ValueError(
            "dist_fn must return logits (B, K_i) with one common B for "
            f"family='multi_categorical', got {shapes}"
        )
    B = _batch_size(z[0], "multi_categorical logits")
    blocks = [_categorical_fisher(t, B) for t in z]

    def apply(u: Any) -> Any:
        return _like(z, [f(t) for f, t in zip(blocks, u)])

    return apply


def _fisher_bernoulli(z: Any) -> Callable[[Tensor], Tensor]:
    z = _single_tensor(z, "dist_fn output for family='bernoulli'")
    B = _batch_size(z, "bernoulli logits")
    p = torch.sigmoid(z)
    w = p * (1 - p) / B

    def apply(u: Tensor) -> Tensor:
        return u * w

    return apply


def _fisher_diag_gaussian(z: Any) -> Callable[[Any], Any]:
    if not isinstance(z, (list, tuple)) or len(z) != 2 or not all(isinstance(t, Tensor) for t in z):
        raise ValueError(
            "dist_fn must return (mean, log_std) for family='diag_gaussian', "
            f"got {type(z).__name__}"
        )
    mean, log_std = z
    B = _batch_size(mean, "diag_gaussian mean")
    try:
        ok = torch.broadcast_shapes(log_std.shape, mean.shape) == mean.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"log_std {tuple(log_std.shape)} must be broadcastable to mean {tuple(mean.shape)} "
            "for family='diag_gaussian'"
        )
    # Per state, F_out = 1/σ² on the mean, 2 on log σ; the 1/B of the batch mean
    # is folded into both. A shared log σ appears in `mult` states (and event
    # positions), so its Fisher block collects mult · 2 / B.
    precision = torch.exp(-2 * log_std) / B
    mult = mean.numel() // max(log_std.numel(), 1)
    log_std_weight = 2.0 * mult / B

    def apply(u: Any) -> Any:
        u_mean, u_log_std = u
        return _like(z, [u_mean * precision, u_log_std * log_std_weight])

    return apply


_FAMILY_FISHERS = {
    "categorical": _fisher_categorical,
    "diag_gaussian": _fisher_diag_gaussian,
    "multi_categorical": _fisher_multi_categorical,
    "bernoulli": _fisher_bernoulli,
}


# ------------------------------------------------------------------- KL by double backprop
def kl_hessian_operator(
    kl_fn: Callable[..., Tensor], params: Params, *args: Any
) -> CurvatureOperator:
    """Hessian of a scalar (mean KL) by double backprop: ``H v = ∇_θ(∇_θ KL · v)``.

    The seed notes' ``compute_hvp`` (and SB3 TRPO's ``hessian_vector_product``):
    the gradient ``∇KL`` is computed once with ``create_graph=True`` and kept;
    each matvec backpropagates ``∇KL · v`` through that graph once more
    (reverse-over-reverse, ≈ one gradient per matvec). Use it as the reference
    for :func:`fisher_operator`; it works for any twice-differentiable scalar.

    Args:
        kl_fn: ``kl_fn(params_dict, *args) -> scalar``, normally the mean
            ``KL(π_old ‖ π_θ)`` with the old distribution held fixed (detached).
        params: Mapping name -> tensor, the point ``θ`` (normally ``θ_old``).
        *args: Further (fixed) arguments of ``kl_fn``.

    Returns:
        A symmetric ``(n, n)`` :class:`CurvatureOperator`.

    Raises:
        ValueError: ``kl_fn`` does not return a scalar.
    """
    space = ParamSpace(params)
    leaves = [p.detach().requires_grad_(True) for p in params.values()]
    with torch.enable_grad():
        kl = kl_fn(dict(zip(space.names, leaves)), *args)
        if not isinstance(kl, Tensor) or kl.numel() != 1:
            raise ValueError("kl_fn must return a scalar tensor")
        grads = torch.autograd.grad(kl.reshape(()), leaves, create_graph=True, allow_unused=True)
        # Inside enable_grad: the flat gradient must stay on the graph even when
        # the caller runs under torch.no_grad().
        g_flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, leaves)
            ]
        )
    if not g_flat.requires_grad:
        # The KL is at most linear in θ: H = 0.
        return CurvatureOperator(torch.zeros_like, space, matmat=torch.zeros_like)
    numels = [p.numel() for p in leaves]

    def matvec(v: Tensor) -> Tensor:
        with torch.enable_grad():
            # retain_graph: the cached ∇KL graph is reused by every matvec (by design).
            parts = torch.autograd.grad(g_flat, leaves, v, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(g.reshape(-1) if g is not None else v.new_zeros(m)) for g, m in zip(parts, numels)]
        )

    def matmat(V: Tensor) -> Tensor:
        k = V.shape[1]
        if k == 0:
            return torch.zeros_like(V)
        try:
            with torch.enable_grad():
                parts = torch.autograd.grad(
                    g_flat, leaves, V.T, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
        except RuntimeError:
            # An op without a batching rule for autograd's batched backward: loop.
            return torch.stack([matvec(V[:, j]) for j in range(k)], dim=1)
        return torch.cat(
            [
                (g.reshape(k, -1) if g is not None else V.new_zeros(k, m))
                for g, m in zip(parts, numels)
            ],
            dim=1,
        ).T

    return CurvatureOperator(matvec, space, matmat=matmat)
