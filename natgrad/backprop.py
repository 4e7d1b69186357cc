"""One reverse pass through an existing autograd graph, without per-call Python overhead.

``torch.autograd.grad(outputs, inputs, grad_outputs)`` validates its arguments in
Python before running the C++ engine. Measured on the logistic-regression HVP
of issue 10 (N = 2,000, D = 50, float64, 1 thread), that validation is ≈ 40 µs
of a ≈ 160 µs double-backprop product, and on its **first** call with a tensor
``grad_outputs`` it imports ``torch.fx.experimental.symbolic_shapes`` and with it
sympy (≈ 1.1 s, the bulk of the first operator's cost in a process).

:func:`vjp` calls the engine directly, as ``torch.autograd.grad`` does after its
checks. That is sound here because every caller passes ``grad_outputs`` whose
shapes, dtypes and devices are already checked (a :class:`LinearOperator`
checks ``v`` against its own shape, dtype and device, and the outputs are ours).
The engine entry point is private torch API; where it is missing (another
torch version) :func:`vjp` falls back to ``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["vjp"]

_ENGINE = getattr(getattr(torch.autograd, "variable", None), "Variable", None)
_ENGINE = getattr(_ENGINE, "_execution_engine", None)


def vjp(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    *,
    create_graph: bool = False,
) -> tuple[Tensor | None, ...]:
    """``Σ_i (∂outputs_i/∂inputs)ᴴ grad_outputs_i`` for each input; ``None`` where unused.

    The graph is always kept (``retain_graph=True``): callers reuse it for
    every product.

    Args:
        outputs: Tensors on the graph (``requires_grad``).
        inputs: Tensors to differentiate with respect to.
        grad_outputs: One cotangent per output, of its shape, dtype and device.
        create_graph: Record the pass itself, so that it can be differentiated.
    """
    if _ENGINE is None:  # pragma: no cover - other torch versions
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
    # run_backward(tensors, grad_tensors, keep_graph, create_graph, inputs,
    #              allow_unreachable, accumulate_grad)
    return _ENGINE.run_backward(
        tuple(outputs), tuple(grad_outputs), True, create_graph, tuple(inputs), True, False
    )
