"""Tests of natgrad.steihaug against a dense eigh solution of the trust-region subproblem."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import natgrad.steihaug
from natgrad.steihaug import SteihaugError, SteihaugStatus, steihaug_solve

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sym(eigs: list[float], seed: int) -> Tensor:
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=_gen(seed)))
    A = Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T
    return (A + A.T) / 2


def _model(A: Tensor, g: Tensor, p: Tensor) -> float:
    return float(g @ p + 0.5 * p @ A @ p)


def exact_tr(A: Tensor, g: Tensor, radius: float) -> Tensor:
    """The global minimiser of gᵀp + ½pᵀAp, ‖p‖ ≤ Δ, by eigh (Moré & Sorensen 1983).

    p(λ) = −(A + λI)⁻¹g with λ ≥ max(0, −λ_min) the root of ‖p(λ)‖ = Δ (bisection in the
    eigenbasis), or λ = 0 when the Newton step of a positive definite A is inside. Assumes
    g is not orthogonal to the bottom eigenvector (no "hard case").
    """
    lam, Q = torch.linalg.eigh(A)
    c = Q.T @ g
    lo = max(0.0, -float(lam[0]))

    def norm(mu: float) -> float:
        return float(torch.linalg.vector_norm(c / (lam + mu)))

    if lam[0] > 0 and norm(0.0) <= radius:
        return -(Q @ (c / lam))
    lo_b, hi_b = lo + 1e-15, lo + 1.0
    while norm(hi_b) > radius:
        hi_b *= 2
    for _ in range(200):
        mid = 0.5 * (lo_b + hi_b)
        lo_b, hi_b = (mid, hi_b) if norm(mid) > radius else (lo_b, mid)
    return -(Q @ (c / (lam + hi_b)))


def cauchy(A: Tensor, g: Tensor, radius: float) -> Tensor:
    """The Cauchy point: the model's minimiser along −g inside the region."""
    gAg = float(g @ A @ g)
    gn = float(g.norm())
    tau = 1.0 if gAg <= 0 else min(1.0, gn**3 / (radius * gAg))
    return -tau * radius / gn * g


# ------------------------------------------------------------- dense references
@pytest.mark.parametrize("seed", range(4))
def test_newton_step_inside_equals_exact_solution(seed: int) -> None:
    A = _sym([0.5, 1.0, 2.0, 5.0, 10.0, 30.0], seed)
    g = torch.randn(6, dtype=F64, generator=_gen(seed + 10))
    res = steihaug_solve(A, g, radius=1e3, rtol=1e-12)
    assert res.status is SteihaugStatus.CONVERGED and not bool(res.on_boundary)
    torch.testing.assert_close(res.p, exact_tr(A, g, 1e3), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(res.p, torch.linalg.solve(A, -g), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("radius", [0.05, 0.3, 1.0])
def test_positive_definite_boundary_within_half_of_optimal_reduction(
    seed: int, radius: float
) -> None:
    # Yuan (2000): for positive definite A the Steihaug point gets at least half of the
    # optimal reduction, and (Steihaug 1983) at least the Cauchy point's.
    A = _sym([0.01, 0.1, 1.0, 3.0, 10.0, 100.0, 1000.0, 2.0], seed)
    g = torch.randn(8, dtype=F64, generator=_gen(seed + 20))
    res = steihaug_solve(A, g, radius=radius, rtol=1e-12)
    p_star = exact_tr(A, g, radius)
    m = _model(A, g, res.p)
    assert res.status in (SteihaugStatus.BOUNDARY, SteihaugStatus.CONVERGED)
    assert _model(A, g, p_star) - 1e-12 <= m <= 0.5 * _model(A, g, p_star) + 1e-12
    assert m <= _model(A, g, cauchy(A, g, radius)) + 1e-12
    assert float(res.p.norm()) <= radius * (1 + 1e-12)
    torch.testing.assert_close(res.model_value, torch.tensor(m, dtype=F64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.p_norm, res.p.norm(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("seed", range(6))
def test_indefinite_goes_to_boundary_beating_cauchy(seed: int) -> None:
    A = _sym([-3.0, -0.5, 0.2, 1.0, 4.0, 9.0], seed)
    g = torch.randn(6, dtype=F64, generator=_gen(seed + 30))
    radius = 0.8
    res = steihaug_solve(A, g, radius=radius, rtol=1e-12)
    assert res.status in (SteihaugStatus.NEGATIVE_CURVATURE, SteihaugStatus.BOUNDARY)
    assert bool(res.on_boundary) and res.success
    torch.testing.assert_close(res.p.norm(), torch.tensor(radius, dtype=F64), rtol=1e-12, atol=0)
    m = _model(A, g, res.p)
    # the upper bound to rounding: Steihaug's first step can be the Cauchy point itself
    assert _model(A, g, exact_tr(A, g, radius)) - 1e-12 <= m <= _model(A, g, cauchy(A, g, radius)) + 1e-12
    torch.testing.assert_close(res.model_value, torch.tensor(m, dtype=F64), rtol=1e-9, atol=1e-12)


def test_negative_definite_first_step_is_exact_boundary_solution() -> None:
    # A = −I: every direction has negative curvature and the exact solution is −Δ g/‖g‖.
    A = -torch.eye(5, dtype=F64)
    g = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=F64)
    res = steihaug_solve(A, g, radius=2.0)
    assert res.status is SteihaugStatus.NEGATIVE_CURVATURE and res.matvecs == 1
    torch.testing.assert_close(res.p, -2.0 * g / g.norm())
    torch.testing.assert_close(res.p, exact_tr(A, g, 2.0), rtol=1e-6, atol=1e-8)


def test_singular_gradient_in_range_converges_to_pseudo_inverse_solution() -> None:
    # A is singular (rank 3 of 5); g in its range: CG from 0 stays in the range and
    # converges to the minimum-norm minimiser −A⁺g.
    A = _sym([0.0, 0.0, 1.0, 2.0, 5.0], 3)
    g = A @ torch.randn(5, dtype=F64, generator=_gen(4))
    res = steihaug_solve(A, g, radius=100.0, rtol=1e-12)
    assert res.status is SteihaugStatus.CONVERGED
    torch.testing.assert_close(res.p, -torch.linalg.pinv(A) @ g, rtol=1e-8, atol=1e-10)


def test_singular_gradient_outside_range_hits_boundary() -> None:
    # g has a component in the null space: the model is unbounded below along it.
    A = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64))
    g = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    res = steihaug_solve(A, g, radius=3.0, rtol=1e-12)
    assert bool(res.on_boundary)
    torch.testing.assert_close(res.p.norm(), torch.tensor(3.0, dtype=F64))
    m = _model(A, g, res.p)
    assert _model(A, g, exact_tr(A, g, 3.0)) - 1e-12 <= m <= _model(A, g, cauchy(A, g, 3.0))


def test_tiny_radius_gives_cauchy_point() -> None:
    A = _sym([1.0, 2.0, 3.0, 4.0], 1)
    g = torch.randn(4, dtype=F64, generator=_gen(2))
    res = steihaug_solve(A, g, radius=1e-6)
    assert res.status is SteihaugStatus.BOUNDARY and int(res.iterations) == 1
    torch.testing.assert_close(res.p, cauchy(A, g, 1e-6))


def test_zero_gradient_gives_zero_step() -> None:
    A = -torch.eye(3, dtype=F64)
    res = steihaug_solve(A, torch.zeros(3, dtype=F64), radius=1.0)
    assert res.status is SteihaugStatus.CONVERGED and res.matvecs == 0
    assert torch.equal(res.p, torch.zeros(3, dtype=F64))


# ----------------------------------------------------------------- preconditioned
@pytest.mark.parametrize("radius", [0.1, 1.0, 50.0])
def test_preconditioned_equals_plain_solve_of_transformed_problem(radius: float) -> None:
    # With M = D (diagonal), the subproblem in y = D^{1/2} p is the plain one with
    # Â = D^{-1/2} A D^{-1/2}, ĝ = D^{-1/2} g, and PCG is CG on it.
    A = _sym([-1.0, 0.3, 1.0, 4.0, 20.0, 7.0], 5)
    g = torch.randn(6, dtype=F64, generator=_gen(6))
    dvec = torch.logspace(-1, 1, 6, dtype=F64)
    s = dvec.rsqrt()
    res = steihaug_solve(A, g, radius, M=lambda r: r / dvec, rtol=1e-10)
    ref = steihaug_solve(s[:, None] * A * s[None, :], s * g, radius, rtol=1e-10)
    assert res.status is ref.status
    torch.testing.assert_close(res.p, s * ref.p, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.p_norm, torch.sqrt(res.p @ (dvec * res.p)), rtol=1e-9, atol=0)
    torch.testing.assert_close(res.model_value, ref.model_value, rtol=1e-9, atol=1e-12)


def test_indefinite_preconditioner_is_reported() -> None:
    A = torch.eye(3, dtype=F64)
    res = steihaug_solve(A, torch.ones(3, dtype=F64), 1.0, M=lambda r: -r)
    assert res.status is SteihaugStatus.INDEFINITE_PRECONDITIONER and not res.success
    with pytest.raises(SteihaugError, match="preconditioner"):
        res.raise_if_failed()


# ------------------------------------------------------------ batched / sync-free
def test_block_and_fixed_mode_match_per_column_solves() -> None:
    A = _sym([-2.0, 0.5, 1.0, 3.0, 8.0, 0.1, 2.0], 7)
    G = torch.randn(7, 4, dtype=F64, generator=_gen(8))
    G[:, 3] = 0.0
    radii = torch.tensor([0.2, 1.0, 30.0, 1.0], dtype=F64)
    block = steihaug_solve(A, G, radii, rtol=1e-10)
    fixed = steihaug_solve(A, G, radii, rtol=0.0, maxiter=30)
    for j in range(4):
        col = steihaug_solve(A, G[:, j], float(radii[j]), rtol=1e-10)
        assert block.statuses[j] is col.status
        torch.testing.assert_close(block.p[:, j], col.p, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(block.model_value[j], col.model_value, rtol=1e-9, atol=1e-12)
        if col.status is not SteihaugStatus.CONVERGED:  # boundary exits are exact in both
            torch.testing.assert_close(fixed.p[:, j], col.p, rtol=1e-9, atol=1e-12)
    assert fixed.matvecs == 30


def test_fixed_mode_makes_no_host_sync() -> None:
    class NoItem(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                raise AssertionError("host sync")
            return func(*args, **(kwargs or {}))

    A = _sym([-1.0, 1.0, 2.0], 9)
    g = torch.randn(3, 2, dtype=F64, generator=_gen(9))
    rad = torch.tensor([0.5, 2.0], dtype=F64)
    with NoItem():
        res = steihaug_solve(A, g, rad, rtol=0.0, maxiter=5, check_finite=False)
    assert res.matvecs == 5


def test_max_iterations_status_and_allow() -> None:
    A = _sym([1.0, 10.0, 100.0, 1000.0, 3.0], 11)
    g = torch.randn(5, dtype=F64, generator=_gen(12))
    res = steihaug_solve(A, g, 1e4, maxiter=2, rtol=1e-12)
    assert res.status is SteihaugStatus.MAX_ITERATIONS and res.matvecs == 2
    assert res.raise_if_failed(allow=("max_iterations",)) is res
    assert _model(A, g, res.p) < 0


def test_non_finite_operator_is_a_status() -> None:
    res = steihaug_solve(lambda v: v * float("nan"), torch.ones(3, dtype=F64), 1.0)
    assert res.status is SteihaugStatus.NON_FINITE
    assert torch.isfinite(res.p).all()


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("radius", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_radius_raises(radius: float) -> None:
    with pytest.raises(ValueError, match="radius"):
        steihaug_solve(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), radius)


def test_bad_inputs_raise() -> None:
    eye = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="g contains NaN"):
        steihaug_solve(eye, torch.tensor([1.0, float("nan")], dtype=F64), 1.0)
    with pytest.raises(ValueError, match="maxiter"):
        steihaug_solve(eye, torch.ones(2, dtype=F64), 1.0, maxiter=0)
    with pytest.raises(ValueError, match="maxiter"):
        steihaug_solve(eye, torch.ones(2, dtype=F64), 1.0, maxiter=float("inf"))
    with pytest.raises(ValueError, match="rtol"):
        steihaug_solve(eye, torch.ones(2, dtype=F64), 1.0, rtol=-1.0)
    with pytest.raises(ValueError, match="shape"):
        steihaug_solve(torch.eye(3, dtype=F64), torch.ones(2, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="radius must be"):
        steihaug_solve(eye, torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64))


# ------------------------------------------------------------- reorthogonalisation
def test_reorthogonalized_cg_converges_in_n_products_where_plain_cg_does_not() -> None:
    # κ = 1e8, n = 40: plain CG loses orthogonality and runs to maxiter; with the residuals
    # reorthogonalised it terminates as in exact arithmetic, at the dense solution.
    A = _sym(torch.logspace(-4, 4, 40, dtype=F64).tolist(), 21)
    g = torch.randn(40, dtype=F64, generator=_gen(22))
    ref = -torch.linalg.solve(A, g)
    plain = steihaug_solve(A, g, 1e12, rtol=1e-10, maxiter=200)
    reorth = steihaug_solve(A, g, 1e12, rtol=1e-10, maxiter=200, reorthogonalize=True)
    assert reorth.status is SteihaugStatus.CONVERGED and reorth.matvecs <= 41
    assert plain.matvecs > 2 * reorth.matvecs
    torch.testing.assert_close(reorth.p, ref, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("radius", [1e-2, 1.0, 30.0, 1e6])
def test_reorthogonalized_equals_plain_on_a_well_conditioned_problem(radius: float) -> None:
    # Where plain CG keeps orthogonality, projecting out the previous residuals changes
    # nothing but rounding: same exit, same step (indefinite A, so every exit is reached).
    A = _sym(torch.linspace(-1.0, 4.0, 30, dtype=F64).tolist(), 23)
    g = torch.randn(30, dtype=F64, generator=_gen(24))
    plain = steihaug_solve(A, g, radius, rtol=1e-10)
    reorth = steihaug_solve(A, g, radius, rtol=1e-10, reorthogonalize=True)
    assert reorth.status is plain.status and reorth.matvecs == plain.matvecs
    torch.testing.assert_close(reorth.p, plain.p, rtol=1e-10, atol=1e-12)
    assert _model(A, g, reorth.p) == pytest.approx(float(reorth.model_value), rel=1e-9)


def test_reorthogonalized_with_a_preconditioner_solves_the_system() -> None:
    d = torch.logspace(-3, 3, 40, dtype=F64)
    A = torch.diag(d.sqrt()) @ _sym(torch.logspace(0, 2, 40, dtype=F64).tolist(), 25) @ torch.diag(
        d.sqrt())
    g = torch.randn(40, dtype=F64, generator=_gen(26))
    res = steihaug_solve(A, g, 1e12, rtol=1e-10, M=lambda r: r / d, reorthogonalize=True)
    assert res.status is SteihaugStatus.CONVERGED and res.matvecs <= 41
    torch.testing.assert_close(res.p, -torch.linalg.solve(A, g), rtol=1e-6, atol=0.0)


def test_reorthogonalize_needs_one_vector_in_tolerance_mode() -> None:
    A = _sym([1.0, 2.0, 3.0], 27)
    with pytest.raises(ValueError, match="reorthogonalize"):
        steihaug_solve(A, torch.ones(3, 2, dtype=F64), 1.0, reorthogonalize=True)
    with pytest.raises(ValueError, match="reorthogonalize"):
        steihaug_solve(A, torch.ones(3, dtype=F64), 1.0, rtol=0.0, maxiter=3,
                       reorthogonalize=True)


def test_doctests() -> None:
    assert doctest.testmod(natgrad.steihaug, raise_on_error=False).failed == 0
