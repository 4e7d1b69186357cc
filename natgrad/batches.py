"""Curvature over a dataset: products streamed batch by batch.

A curvature constructor given ``data=`` (a list of batches, a
:class:`torch.utils.data.DataLoader`, any re-iterable of batches) returns the
operator of the **full-data mean**. Each per-batch function is a mean over its
batch (the losses, the ``1/B`` of the Fisher and of the GGN's output Hessians),
so with ``n_b`` examples in batch ``b`` and ``N = Σ_b n_b``::

    A v = Σ_b (n_b / N) A_b v

which is exactly the operator of the same function on the concatenated data.
``n_b`` is the size of dimension 0 of the first tensor in the batch.

Cost and memory: every product makes **one pass over the data**, building the
batch's linearisation, applying it and discarding it before the next batch, so
memory stays that of one batch whatever the dataset size (nothing is cached
across products). A block ``V`` of ``k`` vectors is applied to each batch at
once, so ``op @ V`` also costs one pass. ``N`` is recounted in every pass, so a
shuffling DataLoader is fine (the sum does not depend on the order); one that
drops or resamples examples differently per pass gives a different operator
per product, which CG does not tolerate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_leaves

from natgrad.curvature_operator import CurvatureOperator
from natgrad.params import ParamSpace

__all__ = ["batch_args", "batch_size", "one_batch_or_streamed", "streamed_operator"]


def batch_args(batch: Any) -> tuple:
    """The positional arguments a batch stands for.

    A tuple or list (what a ``TensorDataset`` DataLoader yields) is spread as
    ``fn(params, *batch)``; anything else (a tensor, a dict) is passed whole as
    ``fn(params, batch)``.
    """
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return tuple(batch)
    return (batch,)


def batch_size(args: tuple) -> int:
    """``n_b``: dimension 0 of the first tensor in the batch.

    Raises:
        ValueError: No tensor with a leading dimension in the batch.
    """
    for leaf in tree_leaves(args):
        if isinstance(leaf, Tensor) and leaf.ndim >= 1:
            return leaf.shape[0]
    raise ValueError(
        "each batch in data must hold a tensor with a leading batch dimension (its size "
        f"weights the batch in the full-data mean), got {[type(a).__name__ for a in args]}"
    )


def _check_data(data: Any) -> None:
    if isinstance(data, (Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an iterable of batches (a list of tuples, a DataLoader), got "
            f"{type(data).__name__}; pass one batch as positional arguments instead"
        )
    if iter(data) is data:
        raise TypeError(
            f"data must be re-iterable (a list, a DataLoader), got the one-shot "
            f"{type(data).__name__}: every product makes one pass over the data"
        )


def streamed_operator(
    space: ParamSpace, data: Iterable[Any], build: Callable[[tuple], CurvatureOperator]
) -> CurvatureOperator:
    """``v -> Σ_b (n_b/N) build(batch_b) v``, one pass over ``data`` per product.

    The first batch's operator is built once here, so that every guard of
    ``build`` fires at construction, then discarded; later batches are checked
    when a product reaches them.

    Args:
        space: The parameter space of every per-batch operator.
        data: Re-iterable of batches (see :func:`batch_args`).
        build: ``args -> operator of the batch mean`` on ``space``.

    Raises:
        TypeError: ``data`` is not a re-iterable of batches.
        ValueError: ``data`` is empty, or a batch has no leading dimension.
    """
    _check_data(data)
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data must hold at least one batch")
    args = batch_args(first)
    batch_size(args)
    build(args)

    def apply(v: Tensor) -> Tensor:
        acc, total = None, 0
        for batch in data:
            args = batch_args(batch)
            n = batch_size(args)
            if n == 0:
                continue
            out = build(args).matvec(v)
            acc = out * n if acc is None else acc.add_(out, alpha=n)
            total += n
        if acc is None:
            raise ValueError("data holds no examples (every batch is empty)")
        return acc.div_(total)

    return CurvatureOperator(apply, space, matmat=apply)


def one_batch_or_streamed(
    space: ParamSpace,
    args: tuple,
    data: Iterable[Any] | None,
    build: Callable[[tuple], CurvatureOperator],
) -> CurvatureOperator:
    """``build(args)`` for one batch, else :func:`streamed_operator` over ``data``.

    Raises:
        ValueError: Both ``args`` and ``data`` are given.
    """
    if data is None:
        return build(args)
    if args:
        raise ValueError("pass one batch as *args or an iterable of batches as data=, not both")
    return streamed_operator(space, data, build)
