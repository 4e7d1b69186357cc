"""Matrix-free linear operators on flat vectors.

A :class:`LinearOperator` wraps a function ``v -> A v`` on ``(n,)`` tensors
together with the metadata a solver needs (``shape``, ``dtype``, ``device``).
It applies to one vector ``(n,)`` or a block of ``k`` vectors ``(n, k)``, adds
the CG damping of the seed notes, ``(A + λI) v = A v + λ v``
(:meth:`LinearOperator.damped`), and converts to a dense tensor (tests, small
problems) or to a :class:`scipy.sparse.linalg.LinearOperator` (scipy's ``cg``,
``eigsh`` and friends run on it in float64).

Example:
    >>> import torch
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> op = LinearOperator.from_matrix(A)
    >>> op @ torch.tensor([1.0, 0.0], dtype=torch.float64)
    tensor([2., 1.], dtype=torch.float64)
    >>> op.damped(1.0).to_dense()
    tensor([[3., 1.],
            [1., 4.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from natgrad.matvec import damp

__all__ = ["LinearOperator"]

Matvec = Callable[[Tensor], Tensor]


def _normalize_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so that it compares equal to ``v.device``."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device
    return device


class LinearOperator:
    """A linear map ``A: R^n -> R^m`` given by its action ``v -> A v``.

    Args:
        matvec: ``v -> A v`` for ``v`` of shape ``(n,)``; must return ``(m,)``.
            Called directly in the hot path (no wrapping beyond the input check).
        shape: ``(m, n)``; curvature operators are square ``(n, n)``.
        dtype: The dtype of ``v`` and ``A v``.
        device: The device of ``v`` and ``A v``.
        matmat: Optional ``V -> A V`` for blocks ``V`` of shape ``(n, k)``. Without
            it, blocks are applied by :func:`torch.vmap` over the columns of
            ``matvec``, and by a loop over columns when ``matvec`` cannot be
            vmapped (e.g. it calls ``.item()`` or ``torch.autograd.grad``).

    Raises:
        ValueError: ``shape`` is not two non-negative ints, or ``matvec`` /
            ``matmat`` is not callable.
    """

    __slots__ = ("_matvec", "_matmat", "shape", "dtype", "device", "_vmap_ok")

    def __init__(
        self,
        matvec: Matvec,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        matmat: Matvec | None = None,
    ) -> None:
        if not callable(matvec):
            raise ValueError("matvec must be callable v -> A v")
        if matmat is not None and not callable(matmat):
            raise ValueError("matmat must be callable V -> A V or None")
        shape = tuple(shape)
        if len(shape) != 2 or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"shape must be (m, n) with non-negative ints, got {shape}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        self._matvec = matvec
        self._matmat = matmat
        self.shape: tuple[int, int] = shape
        self.dtype: torch.dtype = dtype
        self.device: torch.device = _normalize_device(device)
        self._vmap_ok = True

    def __repr__(self) -> str:
        m, n = self.shape
        return f"{type(self).__name__}(shape=({m}, {n}), dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ apply
    def matvec(self, v: Tensor) -> Tensor:
        """Apply the operator: ``A v`` for ``(n,)``, ``A V`` for ``(n, k)``.

        Args:
            v: ``(n,)`` or ``(n, k)`` tensor of the operator's dtype and device.

        Returns:
            ``(m,)`` or ``(m, k)`` tensor.

        Raises:
            ValueError: ``v`` has the wrong shape, dtype or device.
        """
        if (
            v.ndim == 1
            and v.shape[0] == self.shape[1]
            and v.dtype == self.dtype
            and v.device == self.device
        ):
            return self._matvec(v)
        self._check(v)
        return self._apply_block(v)

    __matmul__ = matvec

    def __call__(self, v: Tensor) -> Tensor:
        """Same as :meth:`matvec`, so the operator is also a plain callable."""
        return self.matvec(v)

    def _check(self, v: Tensor) -> None:
        if not isinstance(v, Tensor):
            raise ValueError(f"v must be a torch.Tensor, got {type(v).__name__}")
        n = self.shape[1]
        if (
            v.ndim not in (1, 2)
            or v.shape[0] != n
            or v.dtype != self.dtype
            or v.device != self.device
        ):
            raise ValueError(
                f"v must be ({n},) or ({n}, k) {self.dtype} on {self.device}, "
                f"got {tuple(v.shape)} {v.dtype} on {v.device}"
            )

    def _apply_block(self, V: Tensor) -> Tensor:
        if self._matmat is not None:
            return self._matmat(V)
        if V.shape[1] == 0:
            return V.new_zeros(self.shape[0], 0)
        if self._vmap_ok:
            try:
                return torch.vmap(self._matvec, in_dims=1, out_dims=1)(V)
            except Exception:  # noqa: BLE001 - any failure: matvec is not vmappable
                # Remember it so the failure (and its cost) is paid only once; a
                # genuine error in matvec re-raises from the loop below.
                self._vmap_ok = False
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    # -------------------------------------------------------------- algebra
    def damped(self, lam: float) -> LinearOperator:
        """The damped operator ``(A + λI)``: ``v -> A v + λ v`` (seed notes' CG damping).

        Args:
            lam: ``λ ≥ 0`` (a finite Python number or 0-dim tensor).

        Returns:
            A new operator; ``self`` is unchanged. ``λ = 0`` returns ``self``.

        Raises:
            ValueError: ``lam`` is negative or not finite, or the operator is not
                square.
        """
        lam = _check_lam(lam)
        self._check_square("damped")
        if lam == 0.0:
            return self
        matmat = None if self._matmat is None else damp(self._matmat, lam)
        op = LinearOperator(
            damp(self._matvec, lam), self.shape, self.dtype, self.device, matmat=matmat
        )
        op._vmap_ok = self._vmap_ok
        return op

    def __add__(self, other: LinearOperator) -> LinearOperator:
        """Sum ``(A + B) v = A v + B v`` of two operators of the same shape/dtype/device."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        if (other.shape, other.dtype, other.device) != (self.shape, self.dtype, self.device):
            raise ValueError(
                f"other must match shape {self.shape}, {self.dtype} on {self.device}; got "
                f"{other.shape}, {other.dtype} on {other.device}"
            )
        a, b = self, other
        return LinearOperator(
            lambda v: a._matvec(v) + b._matvec(v),
            self.shape,
            self.dtype,
            self.device,
            matmat=lambda V: a._apply_block(V) + b._apply_block(V),
        )

    def __mul__(self, alpha: float) -> LinearOperator:
        """Scalar multiple ``(α A) v = α (A v)``."""
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = float(alpha)
        if not isinstance(alpha, Real):
            return NotImplemented
        a, alpha = self, float(alpha)
        return LinearOperator(
            lambda v: a._matvec(v) * alpha,
            self.shape,
            self.dtype,
            self.device,
            matmat=lambda V: a._apply_block(V) * alpha,
        )

    __rmul__ = __mul__

    @classmethod
    def identity(
        cls, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> LinearOperator:
        """The identity ``I_n`` (so that ``op + lam * LinearOperator.identity(...)`` works)."""
        return cls(lambda v: v, (n, n), dtype, device, matmat=lambda V: V)

    # ---------------------------------------------------------- conversions
    @classmethod
    def from_matrix(cls, A: Tensor) -> LinearOperator:
        """Wrap a dense ``(m, n)`` tensor: ``v -> A @ v``.

        Raises:
            ValueError: ``A`` is not a 2-D tensor.
        """
        if not isinstance(A, Tensor) or A.ndim != 2:
            raise ValueError(f"A must be a 2-D tensor, got {getattr(A, 'shape', type(A).__name__)}")
        return cls(A.mv, tuple(A.shape), A.dtype, A.device, matmat=A.mm)

    def to_dense(self, chunk_size: int = 64) -> Tensor:
        """Materialise ``A`` by applying it to the columns of the identity.

        ``n`` matvecs in blocks of ``chunk_size`` columns; for tests and small
        problems only (memory ``m·n``).

        Returns:
            ``(m, n)`` tensor of the operator's dtype (float64 if the operator is).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        m, n = self.shape
        cols = []
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matvec(E))
        if not cols:
            return torch.zeros(m, 0, dtype=self.dtype, device=self.device)
        return torch.cat(cols, dim=1)

    def to_scipy(self):  # -> scipy.sparse.linalg.LinearOperator
        """A :class:`scipy.sparse.linalg.LinearOperator` in float64 numpy.

        Inputs are converted to the operator's dtype/device, outputs back to
        float64 numpy on the host, so ``scipy.sparse.linalg.cg`` / ``eigsh`` run
        on it directly. (A float32 operator is therefore only float32-accurate.)
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        dtype, device = self.dtype, self.device

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype=dtype, device=device)
            return self.matvec(t.reshape(-1)).to(torch.float64).cpu().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(X, dtype=np.float64)).to(dtype=dtype, device=device)
            return self.matvec(t).to(torch.float64).cpu().numpy()

        return ScipyLinearOperator(self.shape, matvec=mv, matmat=mm, dtype=np.float64)

    def _check_square(self, what: str) -> None:
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"{what} needs a square operator, this one is {self.shape}")


def _check_lam(lam: float) -> float:
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must be a scalar, got shape {tuple(lam.shape)}")
        lam = float(lam)
    if not isinstance(lam, Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return float(lam)
