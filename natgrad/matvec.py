"""Operators as functions ``v -> A v``: coercion of every accepted kind, and damping.

:func:`as_matvec` turns what a solver accepts as ``A`` (a dense tensor, a
:class:`natgrad.linop.LinearOperator` or any object with ``.matvec``/``.shape``, a numpy
or scipy matrix or ``scipy.sparse.linalg.LinearOperator``, a plain callable) into one
function on tensors shaped like the right-hand side, checking shape, dtype and device once.
:func:`damp` is the one implementation of the damping ``(A + λI) v = A v + λ v`` that
:func:`natgrad.cg.cg_solve`, :func:`natgrad.trust_region.natural_step` and
:meth:`natgrad.linop.LinearOperator.damped` share.

Example:
    >>> import torch
    >>> b = torch.ones(2, dtype=torch.float64)
    >>> mv = damp(as_matvec(torch.eye(2, dtype=torch.float64), b), 0.5)
    >>> mv(b)
    tensor([1.5000, 1.5000], dtype=torch.float64)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Matvec", "as_matvec", "check_damping", "damp", "same_device"]

Matvec = Callable[[Tensor], Tensor]


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same ("cuda" equals "cuda:0" when an index is missing)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_damping(lam: Any, name: str = "damping") -> float:
    """``λ`` as a Python float; ValueError naming ``name`` unless a finite number ``≥ 0``."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(lam.shape)}")
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {lam!r}")
    return float(lam)


def damp(fn: Matvec, lam: float) -> Matvec:
    """The damped map ``v -> fn(v) + λ v`` (``fn`` itself when ``λ = 0``); one fused add."""
    lam = check_damping(lam)
    if lam == 0.0:
        return fn

    def damped(v: Tensor) -> Tensor:
        return torch.add(fn(v), v, alpha=lam)

    return damped


def _check_output(name: str, fn: Matvec) -> Matvec:
    """Wrap ``fn`` so that a wrongly shaped/typed output is a ValueError (metadata only)."""

    def checked(v: Tensor) -> Tensor:
        out = fn(v)
        if not isinstance(out, Tensor):
            raise ValueError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
        # Tensors' devices carry their index, so != is exact (and cheaper than same_device).
        if out.shape != v.shape or out.dtype != v.dtype or out.device != v.device:
            raise ValueError(
                f"{name} maps a {tuple(v.shape)} {v.dtype} tensor on {v.device} to "
                f"{tuple(out.shape)} {out.dtype} on {out.device}; it must preserve shape, dtype "
                f"and device (for a block b of shape (n, k) it must accept (n, k): wrap a "
                f"vector-only function in natgrad.linop.LinearOperator)"
            )
        return out

    return checked


def _is_scipy(A: Any) -> bool:
    """A scipy sparse matrix or ``scipy.sparse.linalg.LinearOperator``, without importing scipy.

    natgrad does not import scipy (half a second of ``import natgrad``): an object of scipy's
    can only exist once the caller has imported it, so the modules are looked up, not loaded.
    """
    sparse = sys.modules.get("scipy.sparse")
    linalg = sys.modules.get("scipy.sparse.linalg")
    return (sparse is not None and sparse.issparse(A)) or (
        linalg is not None and isinstance(A, linalg.LinearOperator)
    )


def _numpy_matvec(mat: Any, name: str, like: Tensor, like_name: str) -> Matvec:
    """Apply a numpy/scipy ``mat`` on the host; a complex ``mat`` needs a complex ``like``."""
    if np.issubdtype(mat.dtype, np.complexfloating) and not like.dtype.is_complex:
        raise ValueError(
            f"{name} is complex ({mat.dtype}) but {like_name} is real ({like.dtype}): the "
            f"imaginary part would be lost; pass a complex {like_name} (e.g. "
            f"{like_name}.to(torch.complex128))"
        )

    def numpy_matvec(v: Tensor) -> Tensor:
        out = np.asarray(mat @ v.detach().cpu().numpy())
        return torch.as_tensor(out, device=v.device).to(v.dtype).reshape(v.shape)

    return numpy_matvec


def as_matvec(A: Any, like: Tensor, name: str = "A", like_name: str = "b") -> Matvec:
    """Coerce ``A`` into a function ``v -> A v`` on tensors shaped like ``like`` (n or n×k).

    Accepts a dense square ``torch.Tensor``; a numpy array, scipy sparse matrix or
    ``scipy.sparse.linalg.LinearOperator`` (applied in numpy and converted back: this path
    syncs and is meant for tests and small problems; a complex one needs a complex
    ``like``); an object with ``.matvec`` and ``.shape`` (:class:`natgrad.linop.LinearOperator`,
    whose ``dtype`` and ``device`` are checked when present); or any callable ``v -> A v``
    (its output shape, dtype and device are checked on every call, metadata only).

    Raises:
        ValueError: Shape, dtype or device mismatch with ``like`` (naming ``name`` and
            ``like_name``).
        TypeError: ``A`` is none of the above.
    """
    n = like.shape[0]

    def check_shape(shape: tuple[int, ...]) -> None:
        if tuple(shape) != (n, n):
            raise ValueError(
                f"{name} has shape {tuple(shape)}, expected ({n}, {n}) to match {like_name}"
            )

    def check_dtype_device(dtype: Any, device: Any) -> None:
        if isinstance(dtype, torch.dtype) and dtype != like.dtype:
            raise ValueError(f"{name} has dtype {dtype} but {like_name} has dtype {like.dtype}")
        if device is not None and not same_device(torch.device(device), like.device):
            raise ValueError(f"{name} is on {device} but {like_name} is on {like.device}")

    if isinstance(A, Tensor):
        check_shape(A.shape)
        check_dtype_device(A.dtype, A.device)
        return A.mv if like.ndim == 1 else A.mm
    if isinstance(A, np.ndarray) or _is_scipy(A):
        check_shape(A.shape)
        return _numpy_matvec(A, name, like, like_name)
    if hasattr(A, "matvec") and hasattr(A, "shape"):
        check_shape(A.shape)
        check_dtype_device(getattr(A, "dtype", None), getattr(A, "device", None))
        return _check_output(name, A.matvec)
    if callable(A):
        return _check_output(name, A)
    raise TypeError(
        f"{name} must be a torch.Tensor, a LinearOperator, a scipy operator/matrix or a "
        f"callable v -> {name} v, got {type(A).__name__}"
    )
