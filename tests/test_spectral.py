"""Tests of natgrad.spectral against eigh, exact traces and scipy's eigsh."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import Tensor

from natgrad import LinearOperator, kl_hessian_operator
from natgrad.spectral import (
    LanczosStatus,
    hutchinson_diag,
    hutchinson_trace,
    lanczos,
    spectral_density,
)

F64 = torch.float64


def _sym(eigs: Tensor, seed: int) -> Tensor:
    n = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    A = Q @ torch.diag(eigs) @ Q.T
    return (A + A.T) / 2


def _indefinite(n: int = 60, seed: int = 0) -> Tensor:
    eigs = torch.cat([torch.linspace(-5, 5, n - 3, dtype=F64),
                      torch.tensor([8.0, 12.0, 20.0], dtype=F64)])
    return _sym(eigs, seed)


# ---------------------------------------------------------------------- lanczos
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_matches_eigh(which: str) -> None:
    A = _indefinite()
    ev, V = torch.linalg.eigh(A)
    res = lanczos(LinearOperator.from_matrix(A), k=3, which=which, maxiter=60, tol=1e-10)
    assert res.status is LanczosStatus.CONVERGED and res.success
    ref = ev.flip(0)[:3] if which == "largest" else ev[:3]
    ref_vecs = V.flip(1)[:, :3] if which == "largest" else V[:, :3]
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-9, atol=1e-9)
    # Eigenvectors up to sign; residuals really are ‖Ay − θy‖.
    torch.testing.assert_close((res.eigenvectors * ref_vecs).sum(0).abs(),
                               torch.ones(3, dtype=F64), rtol=0, atol=1e-6)
    true_res = torch.linalg.vector_norm(A @ res.eigenvectors - res.eigenvectors * res.eigenvalues,
                                        dim=0)
    torch.testing.assert_close(true_res, res.residual_norms, rtol=1e-3, atol=1e-9)


def test_lanczos_matches_scipy_eigsh_on_a_hessian_operator() -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(80, 6, dtype=F64, generator=g)
    y = torch.randn(80, dtype=F64, generator=g)
    params = {"w1": torch.randn(6, 5, dtype=F64, generator=g),
              "w2": torch.randn(5, dtype=F64, generator=g)}

    def loss(p: dict[str, Tensor]) -> Tensor:
        return ((torch.tanh(X @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    H = kl_hessian_operator(loss, params)  # the Hessian of any scalar, by double backprop
    res = lanczos(H, k=2, maxiter=35, tol=1e-10, generator=3)
    ref = scipy.sparse.linalg.eigsh(H.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(res.eigenvalues.numpy(), np.sort(ref)[::-1], rtol=1e-8)
    small = lanczos(H, k=1, which="smallest", maxiter=35, tol=1e-10, generator=3)
    ref_sa = scipy.sparse.linalg.eigsh(H.to_scipy(), k=1, which="SA", return_eigenvectors=False)
    np.testing.assert_allclose(small.eigenvalues.numpy(), ref_sa, rtol=1e-6, atol=1e-10)


def test_lanczos_invariant_subspace_and_determinism() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64))
    v0 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)  # sees eigenvalues 1 and 3 only
    res = lanczos(A, k=2, v0=v0)
    assert res.status is LanczosStatus.INVARIANT_SUBSPACE and res.iterations == 2
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 1.0], dtype=F64))
    bad = lanczos(A, k=3, v0=v0)
    assert bad.status is LanczosStatus.SUBSPACE_TOO_SMALL and not bad.success
    B = _indefinite(30, 2)
    a = lanczos(B, k=2, maxiter=8, generator=5)
    b = lanczos(B, k=2, maxiter=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.status is LanczosStatus.MAX_ITERATIONS


def test_lanczos_without_reorthogonalization_still_finds_top_eigenvalue() -> None:
    A = _indefinite(100, 4)
    res = lanczos(A, k=1, maxiter=100, reorthogonalize=False, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues[0], torch.tensor(20.0, dtype=F64))


def test_lanczos_bad_input() -> None:
    A = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="k must be <= n"):
        lanczos(A, k=4)
    with pytest.raises(ValueError, match="which"):
        lanczos(A, which="LM")
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="v0"):
        lanczos(A, v0=torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="generator"):
        lanczos(A, generator="seed")


# ------------------------------------------------------- spectral density (SLQ)
def test_slq_quadrature_is_exact_for_low_degree_polynomials() -> None:
    # Σ_j τ_j θ_j^p = vᵀA^p v / vᵀv for p < 2m, for each probe v (Gauss quadrature).
    A = _indefinite(40, 6)
    gen = torch.Generator().manual_seed(7)
    dens = spectral_density(A, num_probes=3, lanczos_steps=6, generator=gen)
    gen = torch.Generator().manual_seed(7)
    probes = [(torch.randint(0, 2, (40, 1), generator=gen, dtype=torch.int8).to(F64) * 2 - 1)[:, 0]
              for _ in range(3)]
    for p in range(0, 12):
        exact = torch.stack([v @ torch.linalg.matrix_power(A, p) @ v / (v @ v) for v in probes])
        quad = (dens.weights * dens.nodes**p).sum(-1)
        torch.testing.assert_close(quad, exact, rtol=1e-8, atol=1e-8)


def test_slq_with_full_krylov_space_recovers_all_eigenvalues() -> None:
    eigs = torch.linspace(-2.0, 3.0, 12, dtype=F64)
    A = _sym(eigs, 8)
    dens = spectral_density(A, num_probes=2, lanczos_steps=12, generator=1)
    torch.testing.assert_close(dens.nodes[0], eigs, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dens.weights.sum(-1), torch.ones(2, dtype=F64))
    grid = torch.linspace(-6, 7, 2001, dtype=F64)
    integral = torch.trapezoid(dens.density(grid, 0.2), grid)
    torch.testing.assert_close(integral, torch.tensor(1.0, dtype=F64), rtol=1e-6, atol=0)


# ------------------------------------------------------------ trace / diagonal
def test_hutchinson_trace_unbiased_and_hutchpp_exact_on_low_rank() -> None:
    A = _indefinite(50, 9)
    est = hutchinson_trace(A, 2000, generator=0)
    exact = torch.trace(A)
    assert abs(float(est.value - exact)) <= 4 * float(est.stderr) and est.matvecs == 2000
    g = torch.Generator().manual_seed(10)
    U = torch.randn(50, 4, dtype=F64, generator=g)
    L = U @ torch.diag(torch.tensor([5.0, -3.0, 2.0, 1.0], dtype=F64)) @ U.T  # rank 4
    pp = hutchinson_trace(L, 15, method="hutch++", generator=1)  # 5 sketch columns ≥ rank
    torch.testing.assert_close(pp.value, torch.trace(L), rtol=1e-10, atol=1e-10)
    again = hutchinson_trace(L, 15, method="hutch++", generator=1)
    assert torch.equal(pp.value, again.value)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum() -> None:
    A = _sym(1.0 / torch.arange(1, 81, dtype=F64) ** 2, 11)  # decays fast: sketch captures it
    exact = float(torch.trace(A))
    errs_h = [abs(float(hutchinson_trace(A, 30, generator=s).value) - exact) for s in range(20)]
    errs_pp = [abs(float(hutchinson_trace(A, 30, method="hutch++", generator=s).value) - exact)
               for s in range(20)]
    assert np.mean(errs_pp) < 0.2 * np.mean(errs_h)


def test_hutchinson_diag() -> None:
    d = torch.linspace(-1.0, 4.0, 10, dtype=F64)
    est = hutchinson_diag(torch.diag(d), 3, generator=2)
    torch.testing.assert_close(est.value, d)  # exact for a diagonal matrix (v² = 1)
    A = _indefinite(20, 12)
    est = hutchinson_diag(A, 4000, generator=3)
    assert bool((abs(est.value - torch.diagonal(A)) <= 5 * est.stderr + 1e-12).all())


def test_estimators_bad_input() -> None:
    A = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="method"):
        hutchinson_trace(A, 10, method="xtrace")
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(A, 2, method="hutch++")
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_diag(A, 0)


def test_doctests() -> None:
    assert doctest.testmod(importlib.import_module("natgrad.spectral")).failed == 0
