"""A growing basis of Krylov vectors, for full reorthogonalisation.

Lanczos (:mod:`natgrad.trust_krylov`) and CG (:mod:`natgrad.steihaug` with
``reorthogonalize=True``) build, one vector per operator product, a basis that is
orthonormal in exact arithmetic: ``M``-orthonormal Lanczos vectors ``Q = [q_1 … q_k]``, or
CG's residuals scaled to ``z_j / sqrt(r_jᵀz_j)``, with ``V = MQ`` (``r_j / sqrt(r_jᵀz_j)``
for CG; ``V = Q`` without a preconditioner). In floating point the new vector drifts back
into the span of the old ones, most on badly conditioned operators: CG then needs far more
than ``n`` products and Lanczos grows spurious copies of converged Ritz values. Projecting
every new residual out of the basis ::

    r ← r − V (Qᵀ r)      (twice: "twice is enough", Parlett)

restores ``Qᵀr = 0`` to rounding, hence exact arithmetic's finite termination, at
``O(nk)`` flops and ``n × k`` stored values (``2nk`` with a preconditioner) after ``k``
products.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KrylovBasis"]


class KrylovBasis:
    """The vectors ``Q`` (``n × k``) and ``V = MQ`` (``Q`` itself without ``M``).

    Stored as rows (``k × n``, each vector contiguous), so an append is one copy into a row
    and a projection two matrix-vector products on contiguous memory: the basis is kept on
    every operator product, and on small problems its per-call overhead, not its flops,
    decides the speed. Storage grows by doubling up to ``capacity`` rows, so a solve that
    converges in a few steps never allocates ``capacity × n``.

    Args:
        like: A vector ``(n,)`` giving size, dtype and device.
        capacity: Most vectors ever appended.
        preconditioned: Whether ``V`` is kept apart from ``Q``.
    """

    def __init__(self, like: Tensor, capacity: int, preconditioned: bool) -> None:
        self.capacity, self.k = capacity, 0
        self.preconditioned = preconditioned
        size = min(capacity, 16)
        self._q_rows = like.new_empty(size, like.shape[0])
        self._v_rows = like.new_empty(size, like.shape[0]) if preconditioned else self._q_rows

    def _grow(self) -> None:
        size = min(2 * self.k, self.capacity)
        grow = self._q_rows.new_empty(size - self.k, self._q_rows.shape[1])
        self._q_rows = torch.cat([self._q_rows, grow])
        self._v_rows = torch.cat([self._v_rows, torch.empty_like(grow)]) if (
            self.preconditioned) else self._q_rows

    def append(self, q: Tensor, v: Tensor, scale: float = 1.0) -> None:
        """Add ``scale·q`` and ``scale·v`` (``v = Mq``; ignored without a preconditioner)."""
        if self.k == self._q_rows.shape[0]:
            self._grow()
        torch.mul(q, scale, out=self._q_rows[self.k])
        if self.preconditioned:
            torch.mul(v, scale, out=self._v_rows[self.k])
        self.k += 1
        # The views project_out reads, made once per append rather than once per call.
        self._Qk = self._q_rows[: self.k]
        self._Vk_t = self._v_rows[: self.k].T

    def project_out(self, r: Tensor) -> Tensor:
        """``r − V Qᵀr`` twice: then ``Qᵀr = 0``, so ``M⁻¹r ⟂_M Q``."""
        for _ in range(2):
            r = torch.addmv(r, self._Vk_t, torch.mv(self._Qk, r), alpha=-1.0)
        return r

    def combine(self, y: Tensor) -> Tensor:
        """``Q y`` for ``y`` (float64, host) of length ``≤ k``."""
        Q_rows = self._q_rows[: y.shape[0]]
        return Q_rows.T @ y.to(dtype=Q_rows.dtype, device=Q_rows.device)
