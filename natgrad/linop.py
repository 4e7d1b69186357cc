"""Matrix-free linear operators on flat vectors.

A :class:`LinearOperator` wraps a function ``v -> A v`` on ``(n,)`` tensors
together with the metadata a solver needs (``shape``, ``dtype``, ``device``).
It applies to one vector ``(n,)`` or a block of ``k`` vectors ``(n, k)``, adds
the CG damping of the seed notes, ``(A + λI) v = A v + λ v``
(:meth:`LinearOperator.damped`), and converts to a dense tensor (tests, small
problems) or to and from a :class:`scipy.sparse.linalg.LinearOperator`.

Algebra, all lazy (nothing is materialised): ``A @ B`` (composition), ``A @ v``
/ ``A @ V`` (products), ``u @ A`` (``Aᵀu``), ``A.T`` (transpose), ``A.H``
(adjoint ``Aᴴ``, the conjugate transpose), ``α * A``, ``A * α``, ``A / α``,
``A + B``, ``A - B``, ``-A`` and ``sum(ops)``. The adjoint is exact whatever the
operator: the ``rmatvec`` given at construction, the operator itself when it
is ``hermitian``, or else ``Aᴴu`` by reverse-mode autodiff of the (linear)
``matvec``, one backward per product.

Example:
    >>> import torch
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> op = LinearOperator.from_matrix(A)
    >>> op @ torch.tensor([1.0, 0.0], dtype=torch.float64)
    tensor([2., 1.], dtype=torch.float64)
    >>> op.damped(1.0).to_dense()
    tensor([[3., 1.],
            [1., 4.]], dtype=torch.float64)
    >>> (2 * op @ op.T - op).to_dense()
    tensor([[ 8.,  9.],
            [ 9., 17.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Complex, Real
from typing import Any

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
        rmatvec: Optional ``u -> Aᴴ u`` for ``u`` of shape ``(m,)`` (the adjoint,
            scipy's convention; ``Aᵀ u`` for real dtypes). Without it (and without
            ``hermitian``) :attr:`H` differentiates ``matvec``.
        hermitian: ``A = Aᴴ`` (symmetric for real dtypes): :attr:`H` and :attr:`T`
            (real) are the operator itself. Not checked.

    Raises:
        ValueError: ``shape`` is not two non-negative ints, ``matvec`` / ``matmat``
            / ``rmatvec`` is not callable, or a ``hermitian`` operator is not square.
    """

    __slots__ = (
        "_matvec",
        "_matmat",
        "_rmatvec",
        "_hermitian",
        "_adjoint",
        "shape",
        "dtype",
        "device",
        "_vmap_ok",
    )

    def __init__(
        self,
        matvec: Matvec,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        matmat: Matvec | None = None,
        rmatvec: Matvec | None = None,
        hermitian: bool = False,
    ) -> None:
        if not callable(matvec):
            raise ValueError("matvec must be callable v -> A v")
        if matmat is not None and not callable(matmat):
            raise ValueError("matmat must be callable V -> A V or None")
        if rmatvec is not None and not callable(rmatvec):
            raise ValueError("rmatvec must be callable u -> Aᴴ u or None")
        shape = tuple(shape)
        if len(shape) != 2 or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"shape must be (m, n) with non-negative ints, got {shape}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
        if hermitian and shape[0] != shape[1]:
            raise ValueError(f"a hermitian operator must be square, got shape {shape}")
        self._matvec = matvec
        self._matmat = matmat
        self._rmatvec = rmatvec
        self._hermitian = bool(hermitian)
        self._adjoint: LinearOperator | None = None
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

    def __matmul__(self, other: Any) -> Any:
        """``A @ B`` composes with another operator; ``A @ v`` / ``A @ V`` applies (:meth:`matvec`)."""
        if isinstance(other, LinearOperator):
            return self._compose(other)
        if isinstance(other, Tensor):
            return self.matvec(other)
        return NotImplemented

    def __rmatmul__(self, u: Any) -> Any:
        """``u @ A = (Aᵀ uᵀ)ᵀ`` for a row vector ``(m,)`` or rows ``(k, m)``."""
        if not isinstance(u, Tensor):
            return NotImplemented
        return self.T.matvec(u) if u.ndim == 1 else self.T.matvec(u.mT).mT

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
        op._hermitian = self._hermitian  # λ is real: (A + λI)ᴴ = Aᴴ + λI
        return op

    def _like(self, matvec: Matvec, matmat: Matvec, rmatvec: Matvec | None, herm: bool):
        return LinearOperator(
            matvec,
            self.shape,
            self.dtype,
            self.device,
            matmat=matmat,
            rmatvec=None if herm else rmatvec,
            hermitian=herm,
        )

    def __add__(self, other: LinearOperator) -> LinearOperator:
        """Sum ``(A + B) v = A v + B v`` of two operators of the same shape/dtype/device."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        self._check_same(other)
        a, b = self, other
        return self._like(
            lambda v: a._matvec(v) + b._matvec(v),
            lambda V: a._apply_block(V) + b._apply_block(V),
            lambda u: a.H.matvec(u) + b.H.matvec(u),
            a._hermitian and b._hermitian,
        )

    def __radd__(self, other: Any) -> LinearOperator:
        """``0 + A = A``, so that ``sum(operators)`` works."""
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        """Difference ``(A − B) v = A v − B v``."""
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return self + (-1.0) * other

    def __neg__(self) -> LinearOperator:
        """``(−A) v = −(A v)``."""
        return self * -1.0

    def __mul__(self, alpha: Any) -> LinearOperator:
        """Scalar multiple ``(α A) v = α (A v)``; ``α`` complex only for complex operators.

        Raises:
            ValueError: A complex ``α`` on a real operator, or a non-finite ``α``.
        """
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = alpha.item()
        if not isinstance(alpha, Complex):
            return NotImplemented
        if not isinstance(alpha, Real) and not self.dtype.is_complex:
            raise ValueError(f"alpha must be real for a {self.dtype} operator, got {alpha!r}")
        if not math.isfinite(abs(alpha)):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        a = self
        alpha = float(alpha) if isinstance(alpha, Real) else complex(alpha)
        conj = alpha.conjugate()
        return self._like(
            lambda v: a._matvec(v) * alpha,
            lambda V: a._apply_block(V) * alpha,
            lambda u: a.H.matvec(u) * conj,
            a._hermitian and isinstance(alpha, float),
        )

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> LinearOperator:
        """``A / α = (1/α) A`` for a non-zero scalar."""
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = alpha.item()
        if not isinstance(alpha, Complex):
            return NotImplemented
        if alpha == 0:
            raise ValueError("alpha must be non-zero")
        return self * (1 / alpha)

    def _compose(self, other: LinearOperator) -> LinearOperator:
        """``(A B) v = A (B v)``, adjoint ``Bᴴ Aᴴ``."""
        if self.shape[1] != other.shape[0]:
            raise ValueError(f"cannot compose {self.shape} with {other.shape}: inner sizes differ")
        if (other.dtype, other.device) != (self.dtype, self.device):
            raise ValueError(
                f"other must be {self.dtype} on {self.device} to compose, got "
                f"{other.dtype} on {other.device}"
            )
        a, b = self, other
        return LinearOperator(
            lambda v: a._matvec(b._matvec(v)),
            (a.shape[0], b.shape[1]),
            self.dtype,
            self.device,
            matmat=lambda V: a._apply_block(b._apply_block(V)),
            rmatvec=lambda u: b.H.matvec(a.H.matvec(u)),
        )

    @property
    def H(self) -> LinearOperator:
        """The adjoint ``Aᴴ`` (conjugate transpose; ``Aᵀ`` for real dtypes), ``(n, m)``.

        Built once and cached. From ``rmatvec`` if given, ``self`` if hermitian,
        else by reverse-mode autodiff of ``matvec``: ``Aᴴu = ∇_x ⟨u, A x⟩`` (exact
        for a linear ``matvec``; it must be differentiable by torch.autograd).
        """
        if self._hermitian:
            return self
        if self._adjoint is None:
            rmatvec = self._rmatvec or self._autograd_adjoint
            adj = LinearOperator(
                rmatvec,
                (self.shape[1], self.shape[0]),
                self.dtype,
                self.device,
                rmatvec=self._matvec,
            )
            adj._adjoint = self
            self._adjoint = adj
        return self._adjoint

    @property
    def T(self) -> LinearOperator:
        """The transpose ``Aᵀ``: :attr:`H` for real dtypes, ``conj(Aᴴ conj(u))`` for complex."""
        if not self.dtype.is_complex:
            return self.H
        adj = self.H
        return LinearOperator(
            lambda u: adj._matvec(u.conj()).conj(),
            adj.shape,
            self.dtype,
            self.device,
            rmatvec=lambda v: self._matvec(v.conj()).conj(),
        )

    def _autograd_adjoint(self, u: Tensor) -> Tensor:
        x = torch.zeros(self.shape[1], dtype=self.dtype, device=self.device, requires_grad=True)
        with torch.enable_grad():
            y = self._matvec(x)
            if not y.requires_grad:
                raise TypeError(
                    "the adjoint of this operator needs rmatvec=, hermitian=True, or a matvec "
                    "that torch.autograd can differentiate (this one returns a detached result)"
                )
            (g,) = torch.autograd.grad(y, x, u, allow_unused=True)
        return g if g is not None else torch.zeros_like(x)

    def _check_same(self, other: LinearOperator) -> None:
        if (other.shape, other.dtype, other.device) != (self.shape, self.dtype, self.device):
            raise ValueError(
                f"other must match shape {self.shape}, {self.dtype} on {self.device}; got "
                f"{other.shape}, {other.dtype} on {other.device}"
            )

    @classmethod
    def identity(
        cls, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> LinearOperator:
        """The identity ``I_n`` (so that ``op + lam * LinearOperator.identity(...)`` works)."""
        return cls(lambda v: v, (n, n), dtype, device, matmat=lambda V: V, hermitian=True)

    # ---------------------------------------------------------- conversions
    @classmethod
    def from_matrix(cls, A: Tensor) -> LinearOperator:
        """Wrap a dense ``(m, n)`` tensor: ``v -> A @ v``.

        Raises:
            ValueError: ``A`` is not a 2-D tensor.
        """
        if not isinstance(A, Tensor) or A.ndim != 2:
            raise ValueError(f"A must be a 2-D tensor, got {getattr(A, 'shape', type(A).__name__)}")
        AH = A.mH
        return cls(A.mv, tuple(A.shape), A.dtype, A.device, matmat=A.mm, rmatvec=AH.mv)

    @classmethod
    def from_scipy(
        cls, A: Any, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> LinearOperator:
        """Wrap a scipy/numpy operator: a ``scipy.sparse.linalg.LinearOperator``, a sparse matrix or
        array, or a 2-D ``numpy.ndarray``.

        Each product moves ``v`` to host numpy, applies ``A @ x`` there and moves
        the result back (for CPU interop, not for GPU hot loops). The adjoint uses
        ``A.H`` (scipy operators) or ``A.conj().T`` (matrices). No scipy import is
        needed: ``A`` is used through ``shape``, ``dtype`` and ``@``.

        Args:
            A: The operator, shape ``(m, n)``.
            dtype: The torch dtype of ``v`` and ``A v``; default ``A.dtype``'s
                (float64 for an integer ``A``). A complex ``A`` needs a complex dtype.
            device: Where ``v`` and ``A v`` live.

        Raises:
            ValueError: ``A`` has no 2-D ``shape``, or is complex and ``dtype`` is real.
        """
        shape = tuple(int(s) for s in getattr(A, "shape", ()))
        if len(shape) != 2 or not hasattr(A, "__matmul__"):
            raise ValueError(f"A must be a 2-D scipy/numpy operator, got {type(A).__name__}")
        np_dtype = np.dtype(getattr(A, "dtype", None) or np.float64)
        if dtype is None:
            kind = np_dtype if np_dtype.kind in "fc" else np.dtype(np.float64)
            dtype = torch.from_numpy(np.empty(0, dtype=kind)).dtype
        if np_dtype.kind == "c" and not dtype.is_complex:
            raise ValueError(f"A is complex ({np_dtype}); pass a complex dtype, got {dtype}")
        AH = A.H if hasattr(A, "H") else A.conj().T
        device = _normalize_device(device)

        def wrap(M: Any) -> Matvec:
            def apply(v: Tensor) -> Tensor:
                out = np.asarray(M @ v.detach().cpu().numpy())
                return torch.as_tensor(out).to(dtype=dtype, device=device)

            return apply

        return cls(wrap(A), shape, dtype, device, matmat=wrap(A), rmatvec=wrap(AH))

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

    def to_scipy(self) -> Any:  # scipy.sparse.linalg.LinearOperator
        """A :class:`scipy.sparse.linalg.LinearOperator` in float64 (complex128) numpy.

        Inputs are converted to the operator's dtype/device, outputs back to
        float64 numpy on the host (complex128 for a complex operator, so no
        imaginary part is lost), so ``scipy.sparse.linalg.cg`` / ``eigsh`` run on
        it directly; its ``rmatvec`` is :attr:`H`. (A float32 operator is
        therefore only float32-accurate.) scipy is imported here, lazily: it is
        an optional dependency that ``import natgrad.linop`` does not pay for.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        dtype, device = self.dtype, self.device
        np_dtype = np.complex128 if dtype.is_complex else np.float64
        host = torch.complex128 if dtype.is_complex else torch.float64

        def convert(op: LinearOperator) -> Callable[[np.ndarray], np.ndarray]:
            def apply(x: np.ndarray) -> np.ndarray:
                t = torch.as_tensor(np.asarray(x, dtype=np_dtype)).to(dtype=dtype, device=device)
                if t.ndim == 2 and t.shape[1] == 1:
                    t = t.reshape(-1)  # scipy passes (n, 1) columns to matvec
                return op.matvec(t).to(host).cpu().numpy()

            return apply

        return ScipyLinearOperator(
            self.shape,
            matvec=convert(self),
            matmat=convert(self),
            rmatvec=lambda x: convert(self.H)(x),
            dtype=np_dtype,
        )

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
