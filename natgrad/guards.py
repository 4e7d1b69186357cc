"""Input and output checks shared by the curvature constructors.

A curvature operator is a fixed linear map only if the function it linearises
is a deterministic, differentiable torch computation from the parameters
passed in to its outputs. Each way of breaking that used to give either a
silently wrong operator or a torch-internal error; these checks turn them into
a :class:`TypeError` / :class:`ValueError` at construction that says what to do:

* floating-point data of another dtype than the parameters (:func:`check_args`);
* BatchNorm (running statistics) or Dropout modules in train mode, reachable
  from the function (:func:`check_modules`);
* outputs that are not tensors (e.g. numpy), and outputs that do not depend on
  the parameters at all (the function ignores its ``params`` argument or
  detaches), which would give an identically zero operator
  (:func:`tracked_outputs`);
* torch.func's own errors for both, re-raised with the advice
  (:func:`translated_errors`).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_leaves

from natgrad.backprop import vjp

__all__ = [
    "broadcast_shape",
    "broadcasts_to",
    "check_args",
    "check_dependence",
    "check_modules",
    "no_dependence_error",
    "tracked_outputs",
    "translated_errors",
]


def broadcast_shape(*shapes: tuple[int, ...] | torch.Size) -> torch.Size:
    """The shape ``shapes`` broadcast to, by numpy's rule (trailing dimensions equal or 1).

    ``torch.broadcast_shapes`` gives the same, but its first call imports
    ``torch.fx.experimental.symbolic_shapes`` and with it sympy: 0.4-0.7 s per process, a
    twentieth of a whole Pendulum run (measured in docs/benchmarks.md).

    Raises:
        ValueError: the shapes do not broadcast.
    """
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size != 1 and out[i] not in (1, size):
                raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            out[i] = size if size != 1 else out[i]
    return torch.Size(out)


def broadcasts_to(shape: tuple[int, ...] | torch.Size, target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (as ``Tensor.expand(target)``)."""
    try:
        return broadcast_shape(shape, target) == tuple(target)
    except ValueError:
        return False


def check_args(args: tuple, dtype: torch.dtype, what: str = "args") -> None:
    """Floating-point tensors in ``args`` must have the parameters' ``dtype``.

    Integer tensors (labels, actions) and non-tensors are not checked. For
    complex parameters real data is allowed (it promotes exactly).

    Raises:
        TypeError: A floating tensor of another dtype, naming its position.
    """
    if dtype.is_complex:
        return
    for i, arg in enumerate(args):
        for leaf in tree_leaves(arg):
            if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dtype != dtype:
                raise TypeError(
                    f"{what}[{i}] is {leaf.dtype} but params are {dtype}: convert the data "
                    f"with .to({dtype}) (or the parameters) so that both share one dtype"
                )


def _reachable_modules(fn: Any, depth: int = 3, seen: set[int] | None = None) -> Iterator[Any]:
    """nn.Modules a function can see: itself, ``__self__``, closure cells, globals it names.

    Functions found there are followed too, ``depth`` levels deep (a loss that calls
    a model function that closes over the module).
    """
    seen = set() if seen is None else seen
    if id(fn) in seen or depth < 0:
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        candidates: list[Any] = [fn.func, *fn.args, *fn.keywords.values()]
    else:
        candidates = [getattr(fn, "__self__", None)]
        for cell in getattr(fn, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                candidates.append(cell.cell_contents)
        code, env = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
        if code is not None:
            candidates.extend(env.get(name) for name in code.co_names)
    if isinstance(fn, torch.nn.Module):
        yield fn
    for obj in candidates:
        if isinstance(obj, torch.nn.Module):
            yield obj
        elif isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
            yield from _reachable_modules(obj, depth - 1, seen)


def check_modules(fn: Any, what: str) -> None:
    """Refuse a function that runs BatchNorm or Dropout in train mode.

    In train mode BatchNorm updates its running statistics at every evaluation
    (torch.func refuses it: "would mutate a captured Tensor") and Dropout draws
    a new mask at every product, so the operator would not be a fixed linear
    map. Only modules reachable from ``fn`` (see :func:`_reachable_modules`)
    are seen; others surface as :func:`translated_errors` or go unnoticed.

    Raises:
        ValueError: Such a module was found, naming it.
    """
    for module in _reachable_modules(fn):
        for name, sub in module.named_modules():
            stateful = isinstance(sub, _NormBase) and sub.track_running_stats
            random = isinstance(sub, _DropoutNd) and sub.p > 0
            if sub.training and (stateful or random):
                kind = "updates its running statistics" if stateful else "draws a new mask"
                raise ValueError(
                    f"{what} uses {type(sub).__name__} {name or type(module).__name__!r} in "
                    f"train mode, which {kind} at every evaluation, so the curvature would not "
                    "be a fixed linear map: call .eval() on the model before building the "
                    "operator (and .train() after)"
                )


def check_dependence(outputs: list[Tensor], leaves: list[Tensor], what: str) -> None:
    """Raise unless some output is reachable from ``leaves`` in the autograd graph.

    ``requires_grad`` alone is not enough: a model called as ``model(x)`` uses its
    own ``nn.Parameter`` objects, which require grad, instead of ``leaves``. One
    backward with zero cotangents, discarded; ``None`` means unreachable.

    Raises:
        ValueError: No output depends on any leaf (:func:`no_dependence_error`).
    """
    live = [z for z in outputs if z.requires_grad]
    if live:
        zeros = [torch.zeros_like(z) for z in live]
        if any(p is not None for p in vjp(live, leaves, zeros)):
            return
    raise no_dependence_error(what)


def no_dependence_error(what: str) -> ValueError:
    """The error for a function whose outputs do not depend on the parameters."""
    return ValueError(
        f"{what}'s outputs do not depend on params: it ignores its params argument or "
        "detaches them (.detach(), .item(), .numpy(), torch.no_grad(), .data), so the "
        "curvature would be identically zero. Compute the outputs from the params passed "
        "in, e.g. with torch.func.functional_call(model, params, inputs)"
    )


def tracked_outputs(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    """``fn`` that checks that its outputs are tensors.

    Raises (when called):
        TypeError: An output is not a tensor (e.g. a numpy array).
    """

    def wrapped(*a: Any) -> Any:
        out = fn(*a)
        for leaf in tree_leaves(out):
            if not isinstance(leaf, Tensor):
                raise TypeError(
                    f"{what} must return torch tensors (or a list/tuple of them), got "
                    f"{type(leaf).__module__}.{type(leaf).__name__}: keep the computation in "
                    "torch (no .numpy()/.tolist()) so that it can be differentiated"
                )
        return out

    return wrapped


@contextlib.contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Re-raise torch.func's errors for numpy conversion and module mutation with advice."""
    try:
        yield
    except RuntimeError as e:
        msg = str(e)
        if "doesn't have storage" in msg or "Can't call numpy()" in msg:
            raise TypeError(
                f"{what} converted a parameter-dependent tensor to numpy (or read its data "
                "pointer): the curvature needs a differentiable torch computation from params "
                "to outputs; return torch tensors and keep numpy out of the function"
            ) from e
        if "mutate a captured Tensor" in msg:
            raise ValueError(
                f"{what} mutates a tensor in place during evaluation (typically BatchNorm in "
                "train mode updating its running statistics): call .eval() on the model "
                "before building the operator"
            ) from e
        raise
