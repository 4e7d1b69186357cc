"""Tests of natgrad.trust_krylov (GLTR) against an independent dense solution of the
trust-region subproblem, against Steihaug, and minimize(method="trust-krylov") against scipy."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor

import natgrad
from natgrad.linop import LinearOperator
from natgrad.minimize import OptimizeStatus, minimize
from natgrad.steihaug import steihaug_solve
from natgrad.trust_krylov import (
    TrustKrylovError,
    TrustKrylovStatus,
    _InteriorPhase,
    tridiagonal_subproblem,
    trust_krylov_solve,
)

F64 = torch.float64
S = TrustKrylovStatus


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sym(eigs: list[float], seed: int) -> tuple[Tensor, Tensor]:
    """``A = V diag(eigs) Vᵀ`` with a random orthogonal ``V`` (returned too)."""
    n = len(eigs)
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=_gen(seed)))
    A = V @ torch.diag(torch.tensor(eigs, dtype=F64)) @ V.T
    return (A + A.T) / 2, V


def _model(A: Tensor, g: Tensor, p: Tensor) -> float:
    return float(g @ p + 0.5 * p @ A @ p)


def exact_tr(A: Tensor, g: Tensor, radius: float) -> tuple[Tensor, float]:
    """The global minimiser of gᵀp + ½pᵀAp, ‖p‖ ≤ Δ, and its multiplier, by dense eigh.

    Independent of the solver under test: eigendecomposition of A (not of a Lanczos T) and
    plain bisection on ‖p(λ)‖ = Δ, p(λ) = −(A + λI)⁻¹g, λ > max(0, −λ_min) (Moré & Sorensen
    1983). Interior: λ = 0 if A ⪰ 0 and ‖A⁺g‖ ≤ Δ with g in the range (the minimum-norm
    minimiser). Hard case: g ⟂ the λ_min eigenspace and ‖(A − λ_min I)⁺g‖ ≤ Δ, then
    p = −(A − λ_min I)⁺g + τv_min on the boundary (one of the two minimisers).
    """
    lam, V = torch.linalg.eigh(A)
    c = V.T @ g
    scale = float(lam.abs().max())
    lo = max(0.0, -float(lam[0]))
    at_pole = (lam + lo).abs() <= 1e-10 * scale
    w = torch.where(at_pole, 0.0, c / torch.where(at_pole, 1.0, lam + lo))
    if float(c[at_pole].norm()) <= 1e-12 * float(c.norm()) and float(w.norm()) <= radius:
        if lo == 0.0:
            return -(V @ w), 0.0
        tau = math.sqrt(radius**2 - float(w.norm()) ** 2)
        return -(V @ w) + tau * V[:, int(at_pole.nonzero()[0])], lo
    a, b = lo, lo + float(c.norm()) / radius + 1.0
    for _ in range(300):
        mid = 0.5 * (a + b)
        if float((c / (lam + mid)).norm()) > radius:
            a = mid
        else:
            b = mid
    return -(V @ (c / (lam + b))), b


def _check_against_exact(A: Tensor, g: Tensor, radius: float, rtol: float = 1e-12, **kw):
    res = trust_krylov_solve(A, g, radius, rtol=rtol, **kw)
    p_ref, lam_ref = exact_tr(A, g, radius)
    m_ref = _model(A, g, p_ref)
    assert float(res.p.norm()) <= radius * (1 + 1e-10)
    # the model value is unique even where the minimiser is not (hard case, singular)
    assert _model(A, g, res.p) == pytest.approx(m_ref, rel=1e-9, abs=1e-12)
    assert float(res.model_value) == pytest.approx(m_ref, rel=1e-9, abs=1e-12)
    assert float(res.multiplier) == pytest.approx(lam_ref, rel=1e-7, abs=1e-9)
    assert float(res.p_norm) == pytest.approx(float(res.p.norm()), rel=1e-10, abs=1e-14)
    return res, p_ref


# ------------------------------------------------------------- dense references
@pytest.mark.parametrize("seed", range(3))
def test_positive_definite_interior_is_newton_step(seed: int) -> None:
    A, _ = _sym([0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 3.0, 7.0], seed)
    g = torch.randn(8, dtype=F64, generator=_gen(seed + 10))
    res, p_ref = _check_against_exact(A, g, 100.0)
    assert res.status is S.CONVERGED and not bool(res.on_boundary) and res.success
    torch.testing.assert_close(res.p, -torch.linalg.solve(A, g), rtol=1e-9, atol=1e-10)
    assert float(res.kkt_residual) <= 1e-12 * float(g.norm())


@pytest.mark.parametrize("seed", range(3))
def test_positive_definite_boundary_equals_exact_solution(seed: int) -> None:
    A, _ = _sym([0.1, 0.3, 1.0, 2.0, 5.0, 9.0, 20.0, 40.0, 60.0, 100.0], seed)
    g = torch.randn(10, dtype=F64, generator=_gen(seed + 20))
    radius = 0.3 * float(torch.linalg.solve(A, g).norm())
    res, p_ref = _check_against_exact(A, g, radius)
    assert res.status is S.BOUNDARY and bool(res.on_boundary)
    assert float(res.p.norm()) == pytest.approx(radius, rel=1e-12)
    torch.testing.assert_close(res.p, p_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_indefinite_equals_exact_solution(seed: int) -> None:
    A, _ = _sym([-3.0, -1.0, -0.2, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 11.0, 12.0], seed)
    g = torch.randn(12, dtype=F64, generator=_gen(seed + 30))
    for radius in (0.1, 1.0, 10.0):
        res, p_ref = _check_against_exact(A, g, radius)
        assert res.status is S.BOUNDARY and float(res.multiplier) > 3.0
        torch.testing.assert_close(res.p, p_ref, rtol=1e-8, atol=1e-10)


def test_hard_case_dense_rotated() -> None:
    # g ⟂ the eigenvector of λ_min = −2 up to rounding; Δ large enough for the hard case.
    A, V = _sym([-2.0, -0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0], seed=5)
    c = torch.randn(9, dtype=F64, generator=_gen(7))
    c[0] = 0.0
    g = V @ c
    radius = 2.0 * float((c[1:] / (torch.tensor([-0.5, 1, 2, 3, 5, 8, 13, 21.0], dtype=F64)
                                   + 2.0)).norm())
    res, p_ref = _check_against_exact(A, g, radius)
    assert res.status in (S.HARD_CASE, S.BOUNDARY)  # rounding may leave a tiny component
    assert float(res.multiplier) == pytest.approx(2.0, rel=1e-7)
    # p is one of the two minimisers: ±τ along v_min
    v = V[:, 0]
    mirror = p_ref - 2 * (p_ref @ v) * v
    err = min(float((res.p - p_ref).norm()), float((res.p - mirror).norm()))
    assert err <= 1e-6 * radius


def test_hard_case_exact_needs_the_restart() -> None:
    # Diagonal A and g with an exact zero: Lanczos can never see e₀ (products keep the zero),
    # the Krylov subspace is invariant at k = n − 1; the restart finds e₀.
    A = torch.diag(torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0], dtype=F64))
    g = torch.tensor([0.0, 0.3, 1.0, -0.5, 2.0, 1.0], dtype=F64)
    res, p_ref = _check_against_exact(A, g, 5.0)
    assert res.status is S.HARD_CASE and bool(res.on_boundary) and res.success
    assert abs(float(res.p[0])) == pytest.approx(abs(float(p_ref[0])), rel=1e-9)
    assert int(res.iterations) == 6
    # Without exploration: the global minimiser within the invariant subspace only (the
    # documented limitation, scipy's default): a higher model value, e₀ never touched.
    plain = trust_krylov_solve(A, g, 5.0, rtol=1e-12, explore_invariant=False)
    assert plain.success and int(plain.iterations) == 5 and float(plain.p[0]) == 0.0
    assert _model(A, g, plain.p) > _model(A, g, res.p) + 1.0


def test_hard_case_after_a_long_invariant_subspace() -> None:
    # n = 40, g zero on 20 coordinates (the lowest eigenvalue −3 among them): the first
    # block is invariant at k = 20; the restarted block must find λ_min = −3.
    d = torch.linspace(-3.0, 10.0, 40, dtype=F64)[torch.randperm(40, generator=_gen(1))]
    g = torch.randn(40, dtype=F64, generator=_gen(2))
    g[d.argsort()[::2]] = 0.0
    A = torch.diag(d)
    res, _ = _check_against_exact(A, g, 5.0, rtol=1e-10)
    assert res.status is S.HARD_CASE and float(res.multiplier) == pytest.approx(3.0)


def test_singular_gradient_in_range_is_minimum_norm_interior() -> None:
    A, V = _sym([0.0, 0.0, 1.0, 2.0, 4.0, 7.0], seed=11)
    g = V[:, 2:] @ torch.randn(4, dtype=F64, generator=_gen(12))  # in range(A)
    res, p_ref = _check_against_exact(A, g, 50.0)
    assert res.status is S.CONVERGED
    torch.testing.assert_close(res.p, -torch.linalg.pinv(A) @ g, rtol=1e-8, atol=1e-10)


def test_singular_gradient_outside_range_is_on_boundary() -> None:
    A, V = _sym([0.0, 0.0, 1.0, 2.0, 4.0, 7.0], seed=13)
    g = torch.randn(6, dtype=F64, generator=_gen(14))
    res, p_ref = _check_against_exact(A, g, 3.0)
    assert res.status is S.BOUNDARY and float(res.p.norm()) == pytest.approx(3.0, rel=1e-12)
    torch.testing.assert_close(res.p, p_ref, rtol=1e-8, atol=1e-10)


def test_tridiagonal_subproblem_hard_case_directly() -> None:
    # T = diag(−1, 1, 3) and e₁ on θ = 1: c ⟂ the lowest eigenvector exactly.
    T = torch.diag(torch.tensor([1.0, -1.0, 3.0], dtype=F64))
    y, lam, hard = tridiagonal_subproblem(T, 2.0, 4.0)
    assert hard and lam == pytest.approx(1.0)
    assert float(y[0]) == pytest.approx(-1.0) and float(y.norm()) == pytest.approx(4.0)
    assert abs(float(y[1])) == pytest.approx(math.sqrt(15.0))
    y, lam, hard = tridiagonal_subproblem(T, 2.0, 0.5)  # small radius: the secular root
    assert not hard and float(y.norm()) == pytest.approx(0.5, rel=1e-12)
    assert float(y[0]) == pytest.approx(-2.0 / (1.0 + lam), rel=1e-12)


# ------------------------------------------ the interior phase (CG in the Lanczos basis)
def _tridiag(alphas: Tensor, betas: Tensor) -> Tensor:
    return torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)


@pytest.mark.parametrize("seed", range(4))
def test_interior_phase_matches_a_dense_solve_at_every_step(seed: int) -> None:
    # y = −γ₀T_k⁻¹e₁, ‖y‖², y₁ and the model value by the O(1) recurrences against
    # torch.linalg.solve on the leading k × k block, for every k.
    gen = _gen(seed)
    alphas = 2.0 + torch.rand(9, dtype=F64, generator=gen) * 3.0
    betas = torch.rand(8, dtype=F64, generator=gen)  # diagonally dominant: T ≻ 0
    gamma0 = 0.7
    phase = _InteriorPhase(gamma0)
    for k in range(1, 10):
        assert phase.push(float(alphas[k - 1]), float(betas[k - 2]) if k > 1 else 0.0)
        T = _tridiag(alphas[:k], betas[: k - 1])
        e1 = torch.zeros(k, dtype=F64)
        e1[0] = 1.0
        y_ref = torch.linalg.solve(T, -gamma0 * e1)
        phase.rnorm = 0.5
        sol = phase.solution()
        torch.testing.assert_close(sol.y, y_ref, rtol=1e-12, atol=1e-14)
        assert phase.norm2 == pytest.approx(float(y_ref @ y_ref), rel=1e-12)
        assert phase.first == pytest.approx(float(y_ref[0]), rel=1e-12)
        assert sol.model == pytest.approx(float(0.5 * y_ref @ T @ y_ref + gamma0 * y_ref[0]),
                                          rel=1e-12)
        assert sol.kkt == pytest.approx(0.5 * abs(float(y_ref[-1])), rel=1e-12)


def test_interior_phase_stops_at_the_first_block_that_is_not_positive_definite() -> None:
    alphas = torch.tensor([2.0, 1.0, 0.3, 4.0], dtype=F64)
    betas = torch.tensor([1.0, 0.9, 0.5], dtype=F64)
    T = _tridiag(alphas, betas)
    first_bad = next(k for k in range(1, 5) if float(torch.linalg.eigvalsh(T[:k, :k])[0]) <= 0)
    phase = _InteriorPhase(1.0)
    pushed = [phase.push(float(alphas[k - 1]), float(betas[k - 2]) if k > 1 else 0.0)
              for k in range(1, first_bad + 1)]
    assert pushed == [True] * (first_bad - 1) + [False]


@pytest.mark.parametrize("radius", [1e3, 20.0, 0.05])
def test_interior_steps_then_the_boundary(radius: float) -> None:
    # Ill-conditioned SPD: many interior (eigh-free) steps; a small radius is crossed
    # after some of them (Δ = 20: 6 interior steps here), and the exact small solves take
    # over from there.
    A, _ = _sym(torch.logspace(-2, 2, 30, dtype=F64).tolist(), 11)
    g = torch.randn(30, dtype=F64, generator=_gen(12))
    res = trust_krylov_solve(A, g, radius, rtol=1e-12)
    p_ref, _ = exact_tr(A, g, radius)
    torch.testing.assert_close(res.p, p_ref, rtol=1e-8, atol=1e-10)
    assert res.status is (S.CONVERGED if radius > 100 else S.BOUNDARY)
    assert float(res.model_value) == pytest.approx(_model(A, g, res.p), rel=1e-10)


# ---------------------------------------------------------- GLTR against Steihaug
@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_steihaug_at_full_krylov_dimension(seed: int) -> None:
    eigs = torch.linspace(-2.0, 10.0, 12, dtype=F64) if seed % 2 else torch.logspace(
        -2, 2, 12, dtype=F64)
    A, _ = _sym(eigs.tolist(), seed)
    g = torch.randn(12, dtype=F64, generator=_gen(seed + 40))
    for radius in (0.05, 0.5, 5.0):
        gltr = trust_krylov_solve(A, g, radius, rtol=0.0)
        st = steihaug_solve(A, g, radius, rtol=1e-12)
        m_gltr, m_st = _model(A, g, gltr.p), _model(A, g, st.p)
        assert m_gltr <= m_st + 1e-12 * abs(m_st)
        assert float(gltr.p.norm()) <= radius * (1 + 1e-12)


def test_strictly_better_than_steihaug_on_an_indefinite_problem() -> None:
    A, _ = _sym([-1.0, 0.5, 1.0, 2.0, 3.0, 4.0], seed=3)
    g = torch.randn(6, dtype=F64, generator=_gen(50))
    gltr = trust_krylov_solve(A, g, 2.0)
    st = steihaug_solve(A, g, 2.0)
    assert float(gltr.model_value) < float(st.model_value) - 1e-3


# ---------------------------------------------------------- kinds, dtypes, options
def test_operator_kinds_and_preconditioner() -> None:
    A, _ = _sym([-1.0, 0.5, 1.0, 2.0, 3.0, 9.0, 12.0], seed=21)
    g = torch.randn(7, dtype=F64, generator=_gen(22))
    dense = trust_krylov_solve(A, g, 1.5, rtol=1e-12)
    for op in (LinearOperator(lambda v: A @ v, (7, 7), F64, "cpu"), A.numpy(), lambda v: A @ v):
        res = trust_krylov_solve(op, g, 1.5, rtol=1e-12)
        torch.testing.assert_close(res.p, dense.p, rtol=1e-10, atol=1e-12)
    # ‖p‖_D with D = diag(d): the plain problem in s = D^{1/2}p.
    d = torch.linspace(0.5, 4.0, 7, dtype=F64)
    res = trust_krylov_solve(A, g, 1.5, rtol=1e-12, M=lambda r: r / d)
    h = d.rsqrt()
    s_ref, _ = exact_tr(h[:, None] * A * h[None, :], h * g, 1.5)
    torch.testing.assert_close(res.p, h * s_ref, rtol=1e-8, atol=1e-10)
    assert float(res.p_norm) == pytest.approx(float((d * res.p * res.p).sum().sqrt()))


def test_float32_matches_float64_reference() -> None:
    A, _ = _sym([-1.5, -0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 9.0, 10.0], seed=31)
    g = torch.randn(10, dtype=F64, generator=_gen(32))
    p_ref, _ = exact_tr(A, g, 2.0)
    res = trust_krylov_solve(A.float(), g.float(), 2.0, rtol=1e-6)
    assert res.p.dtype == torch.float32 and res.model_value.dtype == torch.float32
    torch.testing.assert_close(res.p.double(), p_ref, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    A, _ = _sym([-1.0, 0.5, 1.0, 2.0, 3.0, 9.0, 12.0], seed=41)
    g = torch.randn(7, dtype=F64, generator=_gen(42))
    cpu = trust_krylov_solve(A, g, 1.0, rtol=1e-12)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-4)):
        res = trust_krylov_solve(A.to("cuda", dtype), g.to("cuda", dtype), 1.0, rtol=1e-12)
        assert res.p.device.type == "cuda" and res.status_code.device.type == "cuda"
        torch.testing.assert_close(res.p.cpu().double(), cpu.p, rtol=0, atol=tol)


def test_max_iterations_zero_gradient_and_non_finite() -> None:
    A, _ = _sym(torch.logspace(-3, 3, 12).tolist(), seed=51)
    g = torch.randn(12, dtype=F64, generator=_gen(52))
    res = trust_krylov_solve(A, g, 1e6, rtol=1e-14, maxiter=3)
    assert res.status is S.MAX_ITERATIONS and int(res.iterations) == 3 == res.matvecs
    assert float(res.model_value) < 0  # still the best step in the 3-dim subspace
    with pytest.raises(TrustKrylovError, match="maxiter"):
        res.raise_if_failed()
    assert res.raise_if_failed(allow=("max_iterations",)) is res
    zero = trust_krylov_solve(A, torch.zeros(12, dtype=F64), 1.0)
    assert zero.status is S.CONVERGED and zero.matvecs == 0 and not zero.p.any()
    nan_op = trust_krylov_solve(lambda v: v * float("nan"), g, 1.0)
    assert nan_op.status is S.NON_FINITE and not nan_op.success
    bad_m = trust_krylov_solve(A, g, 1.0, M=lambda r: -r)
    assert bad_m.status is S.INDEFINITE_PRECONDITIONER


def test_bad_input_raises_clear_errors() -> None:
    A, _ = _sym([1.0, 2.0, 3.0], seed=61)
    g = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"radius must be finite and > 0, got -1\.0"):
        trust_krylov_solve(A, g, -1.0)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="radius"):
            trust_krylov_solve(A, g, bad)
    with pytest.raises(ValueError, match="shape"):
        trust_krylov_solve(A, torch.ones(3, 2, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="maxiter"):
        trust_krylov_solve(A, g, 1.0, maxiter=0)
    with pytest.raises(ValueError, match="rtol"):
        trust_krylov_solve(A, g, 1.0, rtol=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        trust_krylov_solve(A, torch.tensor([1.0, float("nan"), 0.0], dtype=F64), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        trust_krylov_solve(A.float(), g, 1.0)
    with pytest.raises(TypeError, match="A must be"):
        trust_krylov_solve("A", g, 1.0)


# -------------------------------------------------- minimize(method="trust-krylov")
def extended_rosenbrock(x: Tensor) -> Tensor:
    odd, even = x[0::2], x[1::2]
    return (100 * (even - odd**2) ** 2 + (1 - odd) ** 2).sum()


def _ext_rosen_np(x: np.ndarray) -> tuple[float, np.ndarray]:
    odd, even = x[0::2], x[1::2]
    g = np.empty_like(x)
    g[0::2] = -400 * odd * (even - odd**2) - 2 * (1 - odd)
    g[1::2] = 200 * (even - odd**2)
    return float(np.sum(100 * (even - odd**2) ** 2 + (1 - odd) ** 2)), g


def _ext_rosen_hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    odd, even = x[0::2], x[1::2]
    out = np.empty_like(v)
    out[0::2] = (1200 * odd**2 - 400 * even + 2) * v[0::2] - 400 * odd * v[1::2]
    out[1::2] = -400 * odd * v[0::2] + 200 * v[1::2]
    return out


def test_rosenbrock_100_matches_scipy_trust_krylov() -> None:
    x0 = np.empty(100)
    x0[0::2], x0[1::2] = -1.2, 1.0
    ref = scipy.optimize.minimize(_ext_rosen_np, x0, jac=True, hessp=_ext_rosen_hessp,
                                  method="trust-krylov", options={"gtol": 1e-8})
    res = minimize(extended_rosenbrock, torch.tensor(x0), method="trust-krylov", gtol=1e-8)
    assert ref.success and res.success and res.status is OptimizeStatus.SUCCESS
    assert res.nit <= ref.nit + 2  # measured: 48 and 48
    torch.testing.assert_close(res.x, torch.ones(100, dtype=F64), rtol=0, atol=1e-8)
    assert res.nfev == res.nit + 1 and res.nhev > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_logistic_regression_reaches_scipy_trust_krylov_optimum(seed: int) -> None:
    g = _gen(seed)
    n, d, lam = 300, 8, 1e-2
    X = torch.randn(n, d, dtype=F64, generator=g) * torch.logspace(-1, 1, d, dtype=F64)
    y = (torch.rand(n, dtype=F64, generator=g) < torch.sigmoid(
        X @ torch.randn(d, dtype=F64, generator=g))).to(F64)
    Xn, yn = X.numpy(), y.numpy()

    def f(w: Tensor) -> Tensor:
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * lam * w @ w

    def f_np(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = Xn @ w
        val = np.mean(np.logaddexp(0, z) - yn * z) + 0.5 * lam * w @ w
        return float(val), Xn.T @ (1 / (1 + np.exp(-z)) - yn) / n + lam * w

    def hessp_np(w: np.ndarray, v: np.ndarray) -> np.ndarray:
        s = 1 / (1 + np.exp(-(Xn @ w)))
        return Xn.T @ (s * (1 - s) * (Xn @ v)) / n + lam * v

    # scipy's trust-krylov cannot go much below ‖∇f‖ ≈ 1e-8 here (seed 0: it stops at
    # 1.3e-8, "A bad approximation caused failure to predict improvement"), so its optimum
    # is known to ‖x − x*‖ ≤ ‖∇f‖ / λ_min(H) ≤ 1e-8 / λ = 1e-6.
    ref = scipy.optimize.minimize(f_np, np.zeros(d), jac=True, hessp=hessp_np,
                                  method="trust-krylov", options={"gtol": 1e-8})
    assert np.linalg.norm(ref.jac) <= 2e-8
    res = minimize(f, torch.zeros(d, dtype=F64), method="trust-krylov", gtol=1e-10)
    assert res.success, res.message
    assert float(res.grad.norm()) <= 1e-10
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=0, atol=1e-6)
    assert float(res.fun) <= float(f(torch.tensor(ref.x))) + 1e-14
    same_gtol = minimize(f, torch.zeros(d, dtype=F64), method="trust-krylov", gtol=1e-8)
    assert same_gtol.success and same_gtol.nit <= ref.nit + 2  # measured: 9 vs 9, 8 vs 8


def test_minimize_trust_krylov_escapes_saddle_and_reports_counts() -> None:
    def f(x: Tensor) -> Tensor:  # saddle at 0 (Hessian diag(−1, 2)), minima at (±1, 0)
        return x[0] ** 4 / 4 - x[0] ** 2 / 2 + x[1] ** 2

    res = natgrad.minimize(f, torch.tensor([1e-3, 1.0], dtype=F64), method="trust-krylov",
                           gtol=1e-10)
    assert res.success
    torch.testing.assert_close(res.x.abs(), torch.tensor([1.0, 0.0], dtype=F64), rtol=0,
                               atol=1e-8)
    with pytest.raises(ValueError, match="'trust-krylov'"):
        natgrad.minimize(f, torch.zeros(2, dtype=F64), method="trust-exact")


def test_doctests() -> None:
    mod = importlib.import_module("natgrad.trust_krylov")
    assert doctest.testmod(mod, raise_on_error=False).failed == 0
