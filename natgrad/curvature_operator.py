"""The operator type every curvature constructor returns.

A :class:`CurvatureOperator` is a square, symmetric (Hermitian for complex
parameters) :class:`~natgrad.linop.LinearOperator` on the flat parameter
vectors of a :class:`~natgrad.params.ParamSpace`: ``op.T`` and ``op.H`` are the
operator itself, and ``op.space`` converts between flat vectors and parameter
dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from natgrad.linop import LinearOperator
from natgrad.params import ParamSpace

__all__ = ["CurvatureOperator", "zero_operator"]


class CurvatureOperator(LinearOperator):
    """A symmetric ``(n, n)`` :class:`LinearOperator` on the flat parameters of ``space``.

    Attributes:
        space: The :class:`ParamSpace` giving the flat ordering.
        outputs: For :func:`~natgrad.ggn_operator` / :func:`~natgrad.fisher_operator`
            on one batch, the model outputs (distribution parameters) at
            ``params``, detached, so a caller can reuse them (e.g. for the old
            log-probabilities) without another forward pass; ``None`` for the
            Hessian operators and for operators streamed over a dataset.
        vjp: For the same operators, the cached reverse-mode product
            ``u -> Jᵀu`` (``u`` structured like ``outputs``, result a flat
            ``(n,)`` vector); ``None`` otherwise. By the chain rule the gradient
            of any loss of the outputs is ``∇_θ ℓ(z(θ)) = Jᵀ ∇_z ℓ``, so
            ``op.vjp(grad_z)`` gives it from the linearisation already computed,
            one backward and no forward pass.
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
            matvec,
            (space.numel, space.numel),
            space.dtype,
            space.device,
            matmat=matmat,
            hermitian=True,
        )
        self.space = space
        self.outputs = outputs
        self.vjp = vjp


def zero_operator(space: ParamSpace) -> CurvatureOperator:
    """The zero map on ``space`` (the Hessian of a function at most linear in θ)."""
    return CurvatureOperator(torch.zeros_like, space, matmat=torch.zeros_like)
