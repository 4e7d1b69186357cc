"""Spectral analysis of symmetric operators: Lanczos, spectral density, trace and diagonal.

Every function takes a symmetric ``A`` as :func:`natgrad.cg.cg_solve` does (a
:class:`natgrad.LinearOperator` such as ``natgrad.hessian_operator(...)``, or a dense
tensor) and only applies it to vectors. Randomness comes from an explicit ``generator``
(a :class:`torch.Generator` or an int seed), so every estimate is reproducible.

* :func:`lanczos`: the ``k`` largest or smallest eigenpairs. ``m`` Lanczos steps build
  ``A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ`` with ``T_m`` tridiagonal; the Ritz pairs
  ``(θ_i, Q_m s_i)`` of ``T_m s_i = θ_i s_i`` have residual ``‖A y_i − θ_i y_i‖ = β_m |e_mᵀ s_i|``
  (Golub & Van Loan §10.1), which is the stopping rule:
  ``β_m |e_mᵀ s_i| ≤ tol · max|θ|`` for the ``k`` wanted. ``reorthogonalize=True`` (default)
  applies full Gram–Schmidt twice against ``Q_m`` each step (no ghost eigenvalues).
* :func:`spectral_density`: stochastic Lanczos quadrature (Golub & Meurant; Ghorbani,
  Krishnan & Xiao 2019, as in pyhessian): per random unit probe ``v``, ``m`` Lanczos steps
  from ``v`` give nodes ``θ_j`` and weights ``τ_j = (e_1ᵀ s_j)²`` with
  ``Σ_j τ_j f(θ_j) = vᵀ f(A) v`` exactly for polynomials ``f`` of degree ``< 2m``; the
  density ``φ(t) = mean_probes Σ_j τ_j 𝒩(t; θ_j, σ²)`` integrates to 1.
* :func:`hutchinson_trace`: ``tr A ≈ (1/s) Σ vᵢᵀ A vᵢ`` with Rademacher ``vᵢ``;
  ``method="hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): with ``S, G`` of ``s/3``
  columns each, ``Q = orth(A S)``, ``tr A ≈ tr(QᵀAQ) + (3/s) tr(Gᵀ(I − QQᵀ) A (I − QQᵀ) G)``,
  exact when ``rank A ≤ s/3``.
* :func:`hutchinson_diag`: ``diag A ≈ (1/s) Σ vᵢ ⊙ A vᵢ`` (Bekas, Kokiopoulou & Saad 2007).

Example:
    >>> import torch
    >>> A = torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64))
    >>> A[0, 0], A[1, 1] = 3.0, 2.0
    >>> res = lanczos(A, k=2, generator=0)
    >>> res.status, [round(float(e), 8) for e in res.eigenvalues]
    (<LanczosStatus.CONVERGED: 'converged'>, [3.0, 2.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from natgrad.matvec import as_matvec
from natgrad.status import ResultStatus, SolverError, Status

__all__ = [
    "Estimate",
    "LanczosError",
    "LanczosResult",
    "LanczosStatus",
    "SpectralDensity",
    "hutchinson_diag",
    "hutchinson_trace",
    "lanczos",
    "spectral_density",
]

Generator = torch.Generator | int | None


class LanczosStatus(Status):
    """Why :func:`lanczos` stopped."""

    CONVERGED = "converged", "every wanted Ritz residual β|e_mᵀs| ≤ tol·max|θ|", True
    INVARIANT_SUBSPACE = (
        "invariant_subspace",
        "β_m = 0: the Krylov space is invariant under A, so its Ritz values are exact "
        "eigenvalues (of the part of A the start vector sees)",
        True,
    )
    MAX_ITERATIONS = (
        "max_iterations",
        "maxiter Lanczos steps before the wanted Ritz residuals reached tol: raise maxiter, "
        "loosen tol, or ask for fewer/better separated eigenvalues",
        False,
    )
    SUBSPACE_TOO_SMALL = (
        "subspace_too_small",
        "the start vector's Krylov space is invariant with dimension < k (it lies in a few "
        "eigenvectors): use another v0 or generator",
        False,
    )
    NON_FINITE = "non_finite", "NaN or inf in A @ q: check the operator and the dtype", False


class LanczosError(SolverError):
    """Raised by :meth:`LanczosResult.raise_if_failed`."""


@dataclass(frozen=True)
class LanczosResult(ResultStatus):
    """Result of :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)``, largest first for ``which="largest"``, smallest first for
            ``"smallest"``.
        eigenvectors: ``(n, k)`` unit Ritz vectors, column ``i`` for ``eigenvalues[i]``.
        residual_norms: ``(k,)`` Ritz residual bounds ``β_m |e_mᵀ s_i|``.
        iterations: Lanczos steps ``m`` (= operator applications).
        status_code: Read :attr:`status`.
    """

    status_type = LanczosStatus
    error_type = LanczosError

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    iterations: int
    status_code: Tensor


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of :func:`spectral_density`.

    Attributes:
        nodes: ``(probes, m)`` Ritz values per probe.
        weights: ``(probes, m)`` quadrature weights, each row sums to 1.
    """

    nodes: Tensor
    weights: Tensor

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """``φ(t) = mean_probes Σ_j τ_j 𝒩(t; θ_j, σ²)`` on ``grid`` (``(g,)``)."""
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        gauss = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
        return (gauss * self.weights[None]).sum(-1).mean(-1)

    def expectation(self, f: Any) -> Tensor:
        """``(1/n) tr f(A) ≈ mean_probes Σ_j τ_j f(θ_j)`` for an elementwise ``f``."""
        return (self.weights * f(self.nodes)).sum(-1).mean()


@dataclass(frozen=True)
class Estimate:
    """A randomized estimate: ``value`` and its standard error (``0`` when exact/unknown)."""

    value: Tensor
    stderr: Tensor
    matvecs: int


# ------------------------------------------------------------------ helpers
def _generator(generator: Generator) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None or isinstance(generator, int) and not isinstance(generator, bool):
        g = torch.Generator()
        return g.manual_seed(0 if generator is None else generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")


def _operator(A: Any) -> tuple[Any, int, torch.dtype, torch.device]:
    """``(matvec, n, dtype, device)`` of a square operator with shape/dtype metadata."""
    shape = getattr(A, "shape", None)
    dtype = getattr(A, "dtype", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or not isinstance(dtype,
                                                                                  torch.dtype):
        raise ValueError(
            "A must be a square natgrad LinearOperator or dense tensor (with shape and dtype), "
            f"got {type(A).__name__}"
        )
    device = torch.device(getattr(A, "device", "cpu"))
    n = int(shape[0])
    # as_matvec specialises on the operand's rank (e.g. mv vs mm for a dense A).
    vec = as_matvec(A, torch.empty(n, dtype=dtype, device=device), "A")
    block = as_matvec(A, torch.empty(n, 1, dtype=dtype, device=device), "A")

    def apply(v: Tensor) -> Tensor:
        return vec(v) if v.ndim == 1 else block(v)

    return apply, n, dtype, device


def _rademacher(n: int, k: int, gen: torch.Generator, dtype, device) -> Tensor:
    v = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8).to(dtype) * 2 - 1
    return v.to(device)


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    a = torch.stack(alphas)
    T = torch.diag(a)
    if betas:
        b = torch.stack(betas)
        T = T + torch.diag(b, 1) + torch.diag(b, -1)
    return T


def _lanczos_steps(matvec, q: Tensor, m: int, reorthogonalize: bool, stop=None):
    """Up to ``m`` Lanczos steps from unit ``q``: ``(alphas, betas, Q, last β, why)``.

    ``stop(T, β)`` (optional) is asked after each step whether the wanted Ritz pairs have
    converged. ``why`` is a :class:`LanczosStatus`.
    """
    n = q.shape[0]
    Q = torch.empty(n, m, dtype=q.dtype, device=q.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    prev, beta_prev = None, None
    scale = 0.0
    for j in range(m):
        Q[:, j] = q
        w = matvec(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q if prev is None else w - alpha * q - beta_prev * prev
        if reorthogonalize:
            for _ in range(2):  # "twice is enough" (Parlett)
                w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)
        scale = max(scale, abs(float(alpha)), float(beta))
        if not (math.isfinite(float(alpha)) and math.isfinite(float(beta))):
            return alphas, betas, Q[:, : j + 1], beta, LanczosStatus.NON_FINITE
        if float(beta) <= n * torch.finfo(q.dtype).eps * scale:
            return alphas, betas, Q[:, : j + 1], beta, LanczosStatus.INVARIANT_SUBSPACE
        if stop is not None and stop(_tridiagonal(alphas, betas), beta):
            return alphas, betas, Q[:, : j + 1], beta, LanczosStatus.CONVERGED
        if j + 1 < m:
            betas.append(beta)
            prev, beta_prev, q = q, beta, w / beta
    return alphas, betas, Q, beta, LanczosStatus.MAX_ITERATIONS


# ----------------------------------------------------------------- functions
def lanczos(
    A: Any,
    k: int = 1,
    *,
    which: str = "largest",
    maxiter: int | None = None,
    tol: float = 1e-8,
    reorthogonalize: bool = True,
    v0: Tensor | None = None,
    generator: Generator = None,
) -> LanczosResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric ``A`` by Lanczos.

    Stopping rule (module docstring): ``β_m |e_mᵀ s_i| ≤ tol · max|θ|`` for the ``k``
    wanted Ritz pairs (checked after every step), an invariant subspace, or ``maxiter``.

    Args:
        A: Symmetric operator with ``shape``/``dtype`` (LinearOperator or dense tensor).
        k: Number of eigenpairs, ``1 ≤ k ≤ n``.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        maxiter: Lanczos steps at most, ``≥ k`` (default ``min(n, max(20, 4k))``).
        tol: Relative residual tolerance.
        reorthogonalize: Full reorthogonalisation (default True; False is the classic
            three-term recurrence, cheaper but with spurious copies of converged values).
        v0: Start vector ``(n,)``; default Rademacher from ``generator``.
        generator: ``torch.Generator`` or int seed (default seed 0).

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: bad ``k``, ``which``, ``maxiter``, ``tol`` or ``v0``; ``A`` not square.
    """
    matvec, n, dtype, device = _operator(A)
    k = _check_count("k", k)
    if k > n:
        raise ValueError(f"k must be <= n = {n}, got {k}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not (float(tol) > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    m = _check_count("maxiter", min(n, max(20, 4 * k)) if maxiter is None else maxiter, k)
    m = min(m, n)
    if v0 is None:
        v0 = _rademacher(n, 1, _generator(generator), dtype, device)[:, 0]
    elif not (isinstance(v0, Tensor) and v0.shape == (n,) and bool(v0.abs().sum() > 0)):
        raise ValueError(f"v0 must be a non-zero ({n},) tensor")
    sign = 1.0 if which == "largest" else -1.0

    def wanted(T: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        theta, S = torch.linalg.eigh(T)
        idx = torch.argsort(sign * theta, descending=True)[:k]
        return theta[idx], S[:, idx], beta * S[-1, idx].abs()

    def converged(T: Tensor, beta: Tensor) -> bool:
        if T.shape[0] < k:
            return False
        theta, _, res = wanted(T, beta)
        return bool((res <= tol * theta.abs().max().clamp(min=torch.finfo(dtype).tiny)).all())

    q = (v0 / torch.linalg.vector_norm(v0)).to(dtype)
    alphas, betas, Q, beta, why = _lanczos_steps(matvec, q, m, reorthogonalize, converged)
    if why is LanczosStatus.NON_FINITE or len(alphas) < k:
        if why is not LanczosStatus.NON_FINITE:
            why = LanczosStatus.SUBSPACE_TOO_SMALL
        nan = torch.full((k,), float("nan"), dtype=dtype, device=device)
        vec = torch.full((n, k), float("nan"), dtype=dtype, device=device)
        return LanczosResult(nan, vec, nan, len(alphas), _code(why, device))
    theta, S, res = wanted(_tridiagonal(alphas, betas), beta)
    vectors = Q @ S
    return LanczosResult(theta, vectors, res, len(alphas), _code(why, device))


def _code(status: LanczosStatus, device: torch.device) -> Tensor:
    return torch.tensor(LanczosStatus.code(status), dtype=torch.int8, device=device)


def spectral_density(
    A: Any,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 30,
    reorthogonalize: bool = True,
    generator: Generator = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the eigenvalue density of ``A`` (module docstring).

    Args:
        A: Symmetric operator with ``shape``/``dtype``.
        num_probes: Random unit probes (Rademacher / √n).
        lanczos_steps: Steps ``m`` per probe (≤ n).
        reorthogonalize: Full reorthogonalisation per probe.
        generator: ``torch.Generator`` or int seed.

    Returns:
        A :class:`SpectralDensity` with ``nodes``/``weights`` of shape ``(num_probes, m)``
        (a probe whose Krylov space is invariant after ``j < m`` steps gets zero weights
        in the unused slots).
    """
    matvec, n, dtype, device = _operator(A)
    P = _check_count("num_probes", num_probes)
    m = min(_check_count("lanczos_steps", lanczos_steps), n)
    gen = _generator(generator)
    nodes = torch.zeros(P, m, dtype=dtype, device=device)
    weights = torch.zeros(P, m, dtype=dtype, device=device)
    for i in range(P):
        v = _rademacher(n, 1, gen, dtype, device)[:, 0] / math.sqrt(n)
        alphas, betas, _, _, _ = _lanczos_steps(matvec, v, m, reorthogonalize)
        theta, S = torch.linalg.eigh(_tridiagonal(alphas, betas))
        j = theta.shape[0]
        nodes[i, :j], weights[i, :j] = theta, S[0] ** 2
        if j < m:
            nodes[i, j:] = theta[-1]
    return SpectralDensity(nodes, weights)


def hutchinson_trace(
    A: Any, num_probes: int = 30, *, method: str = "hutchinson", generator: Generator = None
) -> Estimate:
    """``tr A`` from ``num_probes`` operator applications (module docstring).

    Args:
        A: Square operator with ``shape``/``dtype`` (symmetry not needed for Hutchinson).
        num_probes: Matrix-vector products to spend (``≥ 3`` for ``"hutch++"``).
        method: ``"hutchinson"`` or ``"hutch++"``.
        generator: ``torch.Generator`` or int seed.

    Returns:
        An :class:`Estimate`; ``stderr`` is the sample standard error of the Hutchinson
        part (``0`` for ``"hutch++"`` with no residual probes).
    """
    matvec, n, dtype, device = _operator(A)
    s = _check_count("num_probes", num_probes, 3 if method == "hutch++" else 1)
    gen = _generator(generator)
    if method == "hutchinson":
        V = _rademacher(n, s, gen, dtype, device)
        samples = (V * matvec(V)).sum(0)
        return Estimate(samples.mean(), _stderr(samples), s)
    if method != "hutch++":
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    c = s // 3
    S = _rademacher(n, c, gen, dtype, device)
    Q, _ = torch.linalg.qr(matvec(S))
    G = _rademacher(n, s - 2 * c, gen, dtype, device)
    G = G - Q @ (Q.T @ G)
    top = torch.trace(Q.T @ matvec(Q))
    samples = (G * matvec(G)).sum(0)
    return Estimate(top + samples.mean(), _stderr(samples), s)


def _stderr(samples: Tensor) -> Tensor:
    if samples.numel() < 2:
        return torch.zeros((), dtype=samples.dtype, device=samples.device)
    return samples.std() / math.sqrt(samples.numel())


def hutchinson_diag(A: Any, num_probes: int = 30, *, generator: Generator = None) -> Estimate:
    """``diag A ≈ (1/s) Σ vᵢ ⊙ A vᵢ`` with Rademacher ``vᵢ`` (exact for diagonal ``A``).

    Returns:
        An :class:`Estimate` with ``(n,)`` value and per-entry standard errors.
    """
    matvec, n, dtype, device = _operator(A)
    s = _check_count("num_probes", num_probes)
    V = _rademacher(n, s, _generator(generator), dtype, device)
    samples = V * matvec(V)
    stderr = samples.std(1) / math.sqrt(s) if s > 1 else torch.zeros_like(samples[:, 0])
    return Estimate(samples.mean(1), stderr, s)
