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

    Storage grows by doubling up to ``capacity`` columns, so a solve that converges in a
    few steps never allocates ``n × capacity``.

    Args:
        like: A vector ``(n,)`` giving size, dtype and device.
        capacity: Most columns ever appended.
        preconditioned: Whether ``V`` is kept apart from ``Q``.
    """

    def __init__(self, like: Tensor, capacity: int, preconditioned: bool) -> None:
        self.capacity, self.k = capacity, 0
        self.preconditioned = preconditioned
        size = min(capacity, 16)
        self.Q = like.new_empty(like.shape[0], size)
        self.V = like.new_empty(like.shape[0], size) if preconditioned else self.Q

    def append(self, q: Tensor, v: Tensor) -> None:
        """Add ``q`` and ``v = Mq`` (``v`` is ignored without a preconditioner)."""
        if self.k == self.Q.shape[1]:
            size = min(2 * self.k, self.capacity)
            grow = self.Q.new_empty(self.Q.shape[0], size - self.k)
            self.Q = torch.cat([self.Q, grow], dim=1)
            self.V = torch.cat([self.V, torch.empty_like(grow)], dim=1) if (
                self.preconditioned) else self.Q
        self.Q[:, self.k] = q
        if self.preconditioned:
            self.V[:, self.k] = v
        self.k += 1
        # The views project_out reads, made once per append rather than once per call.
        self._Qt = self.Q[:, : self.k].T
        self._V = self.V[:, : self.k] if self.preconditioned else self._Qt.T

    def project_out(self, r: Tensor) -> Tensor:
        """``r − V Qᵀr`` twice: then ``Qᵀr = 0``, so ``M⁻¹r ⟂_M Q``."""
        for _ in range(2):
            r = torch.addmv(r, self._V, torch.mv(self._Qt, r), alpha=-1.0)
        return r

    def combine(self, y: Tensor) -> Tensor:
        """``Q y`` for ``y`` (float64, host) of length ``≤ k``."""
        Q = self.Q[:, : y.shape[0]]
        return Q @ y.to(dtype=Q.dtype, device=Q.device)
