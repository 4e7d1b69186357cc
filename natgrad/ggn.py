"""The generalized Gauss-Newton matrix ``G = Jᵀ H_out J`` of ``loss(model_fn(θ))``.

The Hessian of a loss of a model's outputs splits by the chain rule into
``Jᵀ H_out J + Σ_i (∂ℓ/∂z_i) ∇²z_i``; the GGN keeps the first term, which is
positive semi-definite for a convex loss, and equals the Hessian for a model
linear in ``θ``. Built on :mod:`natgrad.gauss_newton` (``J`` and ``Jᵀ`` cached once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from natgrad.curvature_operator import CurvatureOperator
from natgrad.gauss_newton import categorical_fisher, gauss_newton_curvature

__all__ = ["ggn_operator"]

OutputHessian = str | Callable[[Any, Any], Any]


def _single_tensor(z: Any, what: str) -> Tensor:
    if not isinstance(z, Tensor):
        raise ValueError(f"{what} must be a single tensor, got {type(z).__name__}")
    return z


def _output_hessian(outputs: Any, output_hessian: OutputHessian) -> Callable[[Any], Any]:
    """``t -> H_out t`` for the chosen loss, at the (detached) outputs."""
    if output_hessian == "mse":
        z = _single_tensor(outputs, "model_fn output for output_hessian='mse'")
        scale = 2.0 / max(z.numel(), 1)
        return lambda t: t * scale
    if output_hessian == "cross_entropy":
        z = _single_tensor(outputs, "model_fn output for output_hessian='cross_entropy'")
        if z.ndim != 2 or z.shape[0] == 0:
            raise ValueError(
                f"model_fn must return logits of shape (B, K) with B >= 1 for "
                f"output_hessian='cross_entropy', got {tuple(z.shape)}"
            )
        return categorical_fisher(z, z.shape[0])
    user_fn = output_hessian
    return lambda t: user_fn(outputs, t)


def ggn_operator(
    model_fn: Callable[..., Any],
    params: Mapping[str, Tensor],
    *args: Any,
    output_hessian: OutputHessian = "mse",
    linearization: str = "transpose",
    data: Iterable[Any] | None = None,
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
        *args: One batch: further (fixed) arguments of ``model_fn`` (e.g. the inputs).
        output_hessian: ``"mse"``, ``"cross_entropy"`` or a callable, see above.
        linearization: How ``J`` is applied: ``"transpose"`` (default),
            ``"linearize"``, ``"jvp"`` or ``"custom"`` (``model_fn.linearize``; see
            :mod:`natgrad.gauss_newton`).
        data: Instead of ``*args``, a re-iterable of batches (each one the
            ``*args`` of ``model_fn``, e.g. ``(x,)`` or ``(x, y)`` whose extra items
            ``model_fn`` ignores): the GGN of the full-data mean loss, one pass over
            the data per product (:mod:`natgrad.batches`).

    Returns:
        A symmetric positive semi-definite (for convex losses) ``(n, n)``
        :class:`CurvatureOperator`; ``op.outputs`` holds ``z`` (one batch only).

    Raises:
        ValueError: Unknown ``output_hessian`` or ``linearization``; outputs of
            the wrong type/shape for the chosen ``output_hessian``; outputs that do
            not depend on ``params``; a train-mode BatchNorm/Dropout; both
            ``*args`` and ``data``.
        TypeError: Non-tensor outputs, numpy inside ``model_fn``, data of another
            floating dtype than ``params``, a one-shot ``data``.
    """
    if isinstance(output_hessian, str) and output_hessian not in ("mse", "cross_entropy"):
        raise ValueError(
            "output_hessian must be 'mse', 'cross_entropy' or a callable (z, t) -> H_out t, "
            f"got {output_hessian!r}"
        )
    if not (isinstance(output_hessian, str) or callable(output_hessian)):
        raise ValueError(f"output_hessian must be a string or a callable, got {output_hessian!r}")
    return gauss_newton_curvature(
        model_fn,
        params,
        args,
        data,
        linearization,
        lambda outputs: _output_hessian(outputs, output_hessian),
        "model_fn",
    )
