"""Tests of natgrad.cg against float64 references (torch.linalg.solve, scipy's cg)."""

from __future__ import annotations

import dataclasses
import doctest
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import natgrad.cg
import natgrad.matvec
from natgrad.cg import CG, CGError, CGIterate, CGStatus, cg_solve
from natgrad.cuda_graph import NoHostSync
from natgrad.status import SolverError

F64 = torch.float64


# ---------------------------------------------------------------- problem cases
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(n: int, lo: float, hi: float, seed: int) -> Tensor:
    """Q diag(eig) Qᵀ with eigenvalues log-spaced in [lo, hi]."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=_gen(seed)))
    eig = torch.logspace(np.log10(lo), np.log10(hi), n, dtype=F64)
    A = Q @ torch.diag(eig) @ Q.T
    return (A + A.T) / 2


def _poisson_2d(m: int) -> Tensor:
    """The 5-point Laplacian on an m×m grid (Dirichlet), n = m²."""
    T = 2 * torch.eye(m, dtype=F64) - torch.diag(torch.ones(m - 1, dtype=F64), 1)
    T = T - torch.diag(torch.ones(m - 1, dtype=F64), -1)
    eye = torch.eye(m, dtype=F64)
    return torch.kron(T, eye) + torch.kron(eye, T)


def _badly_scaled(n: int, seed: int) -> Tensor:
    """D S D with S well conditioned and D spanning 6 orders: Jacobi undoes D."""
    S = _spd(n, 1.0, 4.0, seed)
    d = torch.logspace(-3, 3, n, dtype=F64)[torch.randperm(n, generator=_gen(seed + 1))]
    return d[:, None] * S * d[None, :]


@dataclass(frozen=True)
class Case:
    name: str
    A: Tensor
    b: Tensor
    jacobi: bool = False


def _cases() -> list[Case]:
    g = _gen(7)
    return [
        Case(
            "spd_well_conditioned", _spd(30, 1.0, 10.0, 0), torch.randn(30, dtype=F64, generator=g)
        ),
        Case(
            "spd_ill_conditioned_jacobi",
            _badly_scaled(40, 1),
            torch.randn(40, dtype=F64, generator=g),
            jacobi=True,
        ),
        Case("poisson_2d", _poisson_2d(8), torch.randn(64, dtype=F64, generator=g)),
        Case("several_rhs", _spd(25, 0.5, 20.0, 2), torch.randn(25, 4, dtype=F64, generator=g)),
    ]


CASES = {c.name: c for c in _cases()}


def _jacobi(A: Tensor) -> Callable[[Tensor], Tensor]:
    d = torch.diagonal(A).clone()
    return lambda r: r / (d if r.ndim == 1 else d[:, None])


def _scipy_cg(A: Tensor, b: Tensor, rtol: float, M: Tensor | None = None) -> np.ndarray:
    """scipy.sparse.linalg.cg column by column, returns (n,) or (n, k)."""
    A_np = A.numpy()
    B = b.numpy().reshape(b.shape[0], -1)
    Minv = None if M is None else scipy.sparse.diags(1.0 / np.diag(M.numpy()))
    cols = []
    for j in range(B.shape[1]):
        x, info = scipy.sparse.linalg.cg(
            A_np, B[:, j], rtol=rtol, atol=0.0, M=Minv, maxiter=10 * len(B)
        )
        assert info == 0
        cols.append(x)
    return np.stack(cols, axis=1).reshape(b.shape)


class Counting:
    """A matvec that counts its applications (one block counts once)."""

    def __init__(self, A: Tensor) -> None:
        self.A = A
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        self.calls += 1
        return self.A @ v


# ------------------------------------------------------------------- the cases
@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_linalg_solve_and_scipy(name: str) -> None:
    case = CASES[name]
    M = _jacobi(case.A) if case.jacobi else None
    res = cg_solve(case.A, case.b, rtol=1e-11, M=M)
    assert res.status is CGStatus.CONVERGED
    assert bool(res.converged.all())
    ref = torch.linalg.solve(case.A, case.b)
    # Forward error ≲ rtol × cond of the (Jacobi-)preconditioned system, ≤ ~40 here.
    err = torch.linalg.vector_norm(res.x - ref) / torch.linalg.vector_norm(ref)
    assert err < 1e-9
    # The recursive residual meets the documented rule, and the true one agrees.
    bnorm = torch.linalg.vector_norm(case.b, dim=0)
    assert bool((res.residual_norm <= 1e-11 * bnorm).all())
    true_r = torch.linalg.vector_norm(case.b - case.A @ res.x, dim=0)
    assert torch.allclose(true_r, res.residual_norm, rtol=0.0, atol=1e-9 * float(bnorm.max()))
    x_scipy = _scipy_cg(case.A, case.b, 1e-11, case.A if case.jacobi else None)
    np.testing.assert_allclose(res.x.numpy(), x_scipy, rtol=0, atol=1e-10 * np.abs(x_scipy).max())
    assert res.x.shape == case.b.shape and res.x.dtype == F64


@pytest.mark.parametrize("name", ["spd_well_conditioned", "poisson_2d"])
def test_iteration_count_matches_scipy(name: str) -> None:
    case = CASES[name]
    counted = []
    scipy.sparse.linalg.cg(case.A.numpy(), case.b.numpy(), rtol=1e-8, callback=counted.append)
    res = cg_solve(case.A, case.b, rtol=1e-8)
    assert abs(int(res.iterations) - len(counted)) <= 1


def test_jacobi_preconditioner_needs_fewer_iterations() -> None:
    case = CASES["spd_ill_conditioned_jacobi"]
    plain = cg_solve(case.A, case.b, rtol=1e-8)
    pre = cg_solve(case.A, case.b, rtol=1e-8, M=_jacobi(case.A))
    assert pre.status is CGStatus.CONVERGED
    assert int(pre.iterations) < int(plain.iterations) // 2


def test_accepts_every_operator_kind() -> None:
    case = CASES["spd_well_conditioned"]
    ref = cg_solve(case.A, case.b, rtol=1e-10).x
    A_np = case.A.numpy()
    kinds = {
        "callable": lambda v: case.A @ v,
        "numpy": A_np,
        "scipy_sparse": scipy.sparse.csr_matrix(A_np),
        "scipy_linop": scipy.sparse.linalg.aslinearoperator(A_np),
    }
    try:
        from natgrad.linop import LinearOperator
    except ImportError:  # pragma: no cover - linop is a sibling module
        pass
    else:
        kinds["natgrad_linop"] = LinearOperator.from_matrix(case.A)
    for kind, A in kinds.items():
        res = cg_solve(A, case.b, rtol=1e-10)
        assert res.status is CGStatus.CONVERGED, kind
        torch.testing.assert_close(res.x, ref, rtol=0, atol=1e-9, msg=kind)


def test_natgrad_linear_operator_block() -> None:
    linop = pytest.importorskip("natgrad.linop")
    case = CASES["several_rhs"]
    op = linop.LinearOperator.from_matrix(case.A)
    res = cg_solve(op, case.b, rtol=1e-10)
    torch.testing.assert_close(res.x, torch.linalg.solve(case.A, case.b), rtol=0, atol=1e-8)


# ----------------------------------------------------------- x0, counts, limits
def test_x0_is_not_mutated_and_is_used() -> None:
    case = CASES["spd_well_conditioned"]
    exact = torch.linalg.solve(case.A, case.b)
    x0 = exact + 1e-3 * torch.randn(30, dtype=F64, generator=_gen(3))
    before = x0.clone()
    cold = cg_solve(case.A, case.b, rtol=1e-10)
    warm = cg_solve(case.A, case.b, x0=x0, rtol=1e-10)
    assert torch.equal(x0, before)
    assert warm.x is not x0
    torch.testing.assert_close(warm.x, exact, rtol=0, atol=1e-9)
    assert warm.status is CGStatus.CONVERGED
    # +1 for r₀ = b − A x0, +1 for the true-residual check of a solve of ≥ 10 iterations
    assert warm.matvecs == int(warm.iterations) + 1 + int(warm.residual_checked)
    assert int(cold.iterations) >= int(warm.iterations)


def test_x0_already_solution_costs_one_matvec() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    b = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    count = Counting(A)
    x0 = torch.ones(3, dtype=F64)
    res = cg_solve(count, b, x0=x0)
    assert res.status is CGStatus.CONVERGED
    assert res.x is not x0 and torch.equal(res.x, x0)
    assert int(res.iterations) == 0 and count.calls == 1 == res.matvecs


def test_maxiter_one_is_one_matvec_and_max_iterations() -> None:
    case = CASES["spd_well_conditioned"]
    count = Counting(case.A)
    res = cg_solve(count, case.b, maxiter=1)
    assert res.status is CGStatus.MAX_ITERATIONS
    assert not bool(res.converged)
    assert count.calls == 1 == res.matvecs
    assert int(res.iterations) == 1
    # One CG step from 0 is the exact line minimiser along b: x = (bᵀb / bᵀAb) b.
    b = case.b
    torch.testing.assert_close(res.x, (b @ b) / (b @ case.A @ b) * b)
    with pytest.raises(CGError, match="maxiter=1"):
        res.raise_if_failed()
    assert res.raise_if_failed(allow_max_iterations=True) is res


@pytest.mark.parametrize("with_x0", [False, True])
@pytest.mark.parametrize("rtol", [1e-8, 0.0])
def test_matvec_count_is_exact(with_x0: bool, rtol: float) -> None:
    case = CASES["poisson_2d"]
    count = Counting(case.A)
    x0 = torch.zeros(64, dtype=F64) + 0.1 if with_x0 else None
    res = cg_solve(count, case.b, x0=x0, rtol=rtol, maxiter=15 if rtol == 0 else None)
    loop = 15 if rtol == 0 else int(res.iterations)
    assert count.calls == res.matvecs == loop + int(with_x0) + int(res.residual_checked)
    assert bool(res.residual_checked) == (rtol > 0)  # tolerance mode, ≥ 10 iterations


def test_default_maxiter_is_ten_n() -> None:
    A = _spd(5, 1.0, 1e6, 4)
    res = cg_solve(A, torch.ones(5, dtype=F64), rtol=0.0, atol=0.0)
    assert res.maxiter == 50 and res.matvecs == 50


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("rtol", [1e-5, 0.0])
def test_zero_rhs_gives_zero_converged(rtol: float) -> None:
    A = _spd(6, 1.0, 3.0, 5)
    count = Counting(A)
    res = cg_solve(count, torch.zeros(6, dtype=F64), rtol=rtol, maxiter=4)
    assert torch.equal(res.x, torch.zeros(6, dtype=F64))
    assert res.status is CGStatus.CONVERGED and bool(res.converged)
    assert int(res.iterations) == 0
    assert float(res.residual_norm) == 0.0
    if rtol > 0:
        assert count.calls == 0


def test_exact_zero_residual_in_fixed_mode_gives_no_nan() -> None:
    # A = I: one step makes r exactly 0; the next 9 iterations would be 0/0.
    A = torch.eye(5, dtype=F64)
    b = torch.stack([torch.arange(1.0, 6.0, dtype=F64), torch.zeros(5, dtype=F64)], 1)
    seen: list[CGIterate] = []
    res = cg_solve(A, b, rtol=0.0, atol=0.0, maxiter=10, callback=seen.append)
    assert torch.equal(res.x, b)
    assert res.statuses == (CGStatus.CONVERGED, CGStatus.CONVERGED)
    assert res.iterations.tolist() == [1, 0]
    assert bool(torch.isfinite(res.residual_norm).all())
    alphas = torch.stack([it.alpha for it in seen])  # (10, 2)
    assert bool(torch.isfinite(alphas).all())
    assert alphas[0].tolist() == [1.0, 0.0] and bool((alphas[1:] == 0).all())


def test_indefinite_matrix_gives_non_positive_curvature() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=F64))
    b = torch.ones(4, dtype=F64)
    res = cg_solve(A, b)
    assert res.status is CGStatus.NON_POSITIVE_CURVATURE
    assert not bool(res.converged)
    assert bool(torch.isfinite(res.x).all())
    # One step along b (bᵀAb = 5 > 0), then p = r₁ + β b has pᵀAp = −6.4 ≤ 0.
    torch.testing.assert_close(res.x, 0.8 * b)
    assert int(res.iterations) == 1
    assert res.matvecs == 2  # the breakdown iteration spends a matvec without an update
    p = res.direction
    assert float(p @ A @ p) <= 0
    torch.testing.assert_close(res.curvature, p @ A @ p)
    torch.testing.assert_close(p, torch.tensor([1.6, 0.8, 3.2, 0.0], dtype=F64))
    with pytest.raises(
        CGError, match=r"breakdown after 1 iteration: pᴴ\(A \+ λI\)p = -6\.4.*add damping"
    ) as info:
        res.raise_if_failed(allow_max_iterations=True)
    assert info.value.result is res


def test_negative_definite_stops_before_any_step() -> None:
    A = -torch.eye(3, dtype=F64)
    res = cg_solve(A, torch.ones(3, dtype=F64), rtol=0.0, atol=0.0, maxiter=5)
    assert res.status is CGStatus.NON_POSITIVE_CURVATURE
    assert torch.equal(res.x, torch.zeros(3, dtype=F64))
    assert int(res.iterations) == 0
    torch.testing.assert_close(res.curvature, torch.tensor(-3.0, dtype=F64))


def test_damping_fixes_indefiniteness_and_equals_shifted_solve() -> None:
    A = _spd(10, 1e-3, 5.0, 6) - 0.5 * torch.eye(10, dtype=F64)
    b = torch.randn(10, dtype=F64, generator=_gen(6))
    lam = 0.75
    res = cg_solve(A, b, damping=lam, rtol=1e-12)
    assert res.status is CGStatus.CONVERGED
    ref = torch.linalg.solve(A + lam * torch.eye(10, dtype=F64), b)
    torch.testing.assert_close(res.x, ref, rtol=0, atol=1e-9)
    shifted = cg_solve(A + lam * torch.eye(10, dtype=F64), b, rtol=1e-12)
    torch.testing.assert_close(res.x, shifted.x, rtol=0, atol=1e-12)


def test_non_finite_input_raises_at_once() -> None:
    A = torch.eye(3, dtype=F64)
    count = Counting(A)
    b = torch.tensor([1.0, float("nan"), 0.0], dtype=F64)
    with pytest.raises(ValueError, match="^b contains NaN"):
        cg_solve(count, b)
    with pytest.raises(ValueError, match="^x0 contains NaN"):
        cg_solve(count, torch.ones(3, dtype=F64), x0=torch.full((3,), float("inf"), dtype=F64))
    assert count.calls == 0
    res = cg_solve(count, b, check_finite=False)
    assert res.status is CGStatus.NON_FINITE


def test_non_finite_operator_output_gives_status() -> None:
    A = _spd(8, 1.0, 10.0, 8)
    calls = []

    def flaky(v: Tensor) -> Tensor:
        calls.append(None)
        out = A @ v
        return out * float("nan") if len(calls) == 3 else out

    b = torch.randn(8, dtype=F64, generator=_gen(8))
    res = cg_solve(flaky, b, rtol=1e-12)
    assert res.status is CGStatus.NON_FINITE
    assert int(res.iterations) == 2  # two good updates, the third matvec was NaN
    two = cg_solve(A, b, rtol=0.0, atol=0.0, maxiter=2)
    torch.testing.assert_close(res.x, two.x, rtol=0, atol=1e-15)  # the last finite iterate
    with pytest.raises(CGError, match="non-finite.*after 2 iterations.*NaN or inf"):
        res.raise_if_failed()


def test_overflowing_step_gives_status_and_keeps_last_iterate() -> None:
    # pᵀAp = 3e-320 > 0 (subnormal), so α = rᵀr / pᵀAp overflows to inf.
    A = 1e-320 * torch.eye(3, dtype=F64)
    res = cg_solve(A, torch.ones(3, dtype=F64), rtol=0.0, atol=0.0, maxiter=3)
    assert res.status is CGStatus.NON_FINITE
    assert torch.equal(res.x, torch.zeros(3, dtype=F64))
    assert int(res.iterations) == 0


def test_indefinite_preconditioner_gives_status() -> None:
    A = _spd(6, 1.0, 2.0, 9)
    res = cg_solve(A, torch.ones(6, dtype=F64), M=lambda r: -r)
    assert res.status is CGStatus.INDEFINITE_PRECONDITIONER
    assert torch.equal(res.x, torch.zeros(6, dtype=F64))
    with pytest.raises(CGError, match="preconditioner M is not positive definite"):
        res.raise_if_failed()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"A": torch.eye(4, dtype=F64)}, "A has shape"),
        ({"A": torch.eye(3, dtype=torch.float32)}, "A has dtype"),
        ({"A": torch.eye(3, dtype=F64, device="meta")}, "A is on meta"),
        ({"b": torch.ones(3, 2, 2, dtype=F64)}, "b must be a real floating"),
        ({"b": torch.ones(3, dtype=torch.int64)}, "b must be a real floating"),
        ({"damping": -1e-3}, "damping must be"),
        ({"rtol": -1.0}, "rtol must be"),
        ({"atol": -1.0}, "atol must be"),
        ({"rtol": float("nan")}, "rtol must be"),
        ({"maxiter": 0}, "maxiter must be"),
        ({"maxiter": 2.5}, "maxiter must be"),
        ({"x0": torch.zeros(4, dtype=F64)}, "x0 must match b"),
        ({"x0": torch.zeros(3, dtype=torch.float32)}, "x0 must match b"),
        ({"A": lambda v: v[:2]}, "A maps a"),
        ({"A": lambda v: v.float()}, "A maps a"),
        ({"M": lambda v: v[:2]}, "M maps a"),
        ({"A": np.eye(4)}, "A has shape"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(kwargs: dict, pattern: str) -> None:
    args = {"A": torch.eye(3, dtype=F64), "b": torch.ones(3, dtype=F64)}
    args.update(kwargs)
    A, b = args.pop("A"), args.pop("b")
    with pytest.raises(ValueError, match=pattern):
        cg_solve(A, b, **args)


def test_linear_operator_dtype_mismatch() -> None:
    linop = pytest.importorskip("natgrad.linop")
    op = linop.LinearOperator.from_matrix(torch.eye(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="A has dtype"):
        cg_solve(op, torch.ones(3, dtype=F64))


def test_unsupported_operator_type() -> None:
    with pytest.raises(TypeError, match="A must be"):
        cg_solve("not an operator", torch.ones(3, dtype=F64))


# ----------------------------------------------------------- seed's properties
def test_residuals_orthogonal_and_directions_conjugate() -> None:
    A = _spd(12, 1.0, 50.0, 10)
    b = torch.randn(12, dtype=F64, generator=_gen(10))
    seen: list[CGIterate] = []
    res = cg_solve(A, b, rtol=0.0, atol=0.0, maxiter=8, callback=seen.append)
    assert [it.iteration for it in seen] == list(range(1, 9))
    residuals = torch.stack([b] + [it.residual.clone() for it in seen], 1)  # r₀..r₈
    directions = torch.stack([it.direction.clone() for it in seen], 1)  # p₀..p₇
    R = residuals / torch.linalg.vector_norm(residuals, dim=0)
    gram = R.T @ R
    torch.testing.assert_close(gram, torch.eye(9, dtype=F64), rtol=0, atol=1e-8)
    P = directions / torch.linalg.vector_norm(directions, dim=0)
    conj = P.T @ A @ P
    off = conj - torch.diag(torch.diagonal(conj))
    assert float(off.abs().max()) < 1e-8 * float(torch.diagonal(conj).min())
    # p₀ = r₀ = b, and the callback's x is the returned x at the end.
    torch.testing.assert_close(directions[:, 0], b)
    torch.testing.assert_close(seen[-1].x, res.x)
    # α = rᵀr / pᵀAp as in the seed.
    alpha0 = (b @ b) / (b @ A @ b)
    torch.testing.assert_close(seen[0].alpha, alpha0)


# -------------------------------------------------------------------- batching
@pytest.mark.parametrize("rtol", [1e-9, 0.0])
def test_batched_columns_equal_separate_solves(rtol: float) -> None:
    A = _spd(20, 1.0, 10.0, 11)
    B = torch.randn(20, 4, dtype=F64, generator=_gen(11))
    B[:, 2] = 0.0  # a zero column converges at once
    B[:, 3] = torch.linalg.eigh(A).eigenvectors[:, 0]  # converges in one step
    kw = {"rtol": rtol, "atol": 0.0, "maxiter": 40 if rtol == 0 else None}
    block = cg_solve(A, B, **kw)
    assert block.x.shape == (20, 4)
    for name in ("iterations", "residual_norm", "converged", "curvature", "tolerance"):
        assert getattr(block, name).shape == (4,), name
    assert len(block.statuses) == 4
    for j in range(4):
        one = cg_solve(A, B[:, j].clone(), **kw)
        torch.testing.assert_close(block.x[:, j], one.x, rtol=1e-8, atol=1e-10)
        # At rtol = 0 the stop is the rounding floor ‖r‖ ≤ ε‖b‖, which the block's matmul and
        # the single matvec (different summation orders) may reach one iteration apart.
        assert abs(int(block.iterations[j]) - int(one.iterations)) <= (0 if rtol else 1)
        assert block.statuses[j] is one.status
    assert block.statuses[2] is CGStatus.CONVERGED and int(block.iterations[2]) == 0
    if rtol > 0:
        assert block.statuses[3] is CGStatus.CONVERGED and int(block.iterations[3]) == 1


def test_batched_breakdown_is_per_column_and_status_is_the_worst() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=F64))
    B = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    res = cg_solve(A, B)
    assert res.statuses == (CGStatus.CONVERGED, CGStatus.NON_POSITIVE_CURVATURE)
    assert res.status is CGStatus.NON_POSITIVE_CURVATURE
    assert res.converged.tolist() == [True, False]
    torch.testing.assert_close(res.x[:, 0], torch.tensor([1.0, 0, 0, 0], dtype=F64))
    assert torch.equal(res.direction[:, 0], torch.zeros(4, dtype=F64))
    assert float(res.direction[:, 1] @ A @ res.direction[:, 1]) <= 0
    assert res.status_mask(CGStatus.NON_POSITIVE_CURVATURE).tolist() == [False, True]
    with pytest.raises(CGError, match="column 1"):
        res.raise_if_failed()


# ------------------------------------------------------------------- no sync


def test_no_sync_mode_detects_syncs() -> None:
    # The guard must be able to fail: .item(), bool() and the tolerance mode sync.
    A = _spd(5, 1.0, 2.0, 12)
    b = torch.ones(5, dtype=F64)
    with NoHostSync():
        with pytest.raises(RuntimeError, match="host sync"):
            b.sum().item()
        with pytest.raises(RuntimeError, match="host sync"):
            bool(b.sum() > 0)
        with pytest.raises(RuntimeError, match="host sync"):
            cg_solve(lambda v: A @ v, b, rtol=1e-6, check_finite=False)
        with pytest.raises(RuntimeError, match="host sync"):
            cg_solve(lambda v: A @ v, b, rtol=0.0, atol=0.0, maxiter=3)  # check_finite syncs


def test_fixed_iteration_mode_never_syncs() -> None:
    A = _spd(16, 0.5, 8.0, 13)
    B = torch.randn(16, 3, dtype=F64, generator=_gen(13))
    B[:, 1] = 0.0  # zero column: exact-zero residual guard
    B[:, 2] = torch.linalg.eigh(A).eigenvectors[:, 3]  # r hits 0 after one step
    d = torch.diagonal(A).clone()[:, None]
    with NoHostSync():
        res = cg_solve(
            lambda V: A @ V,
            B,
            rtol=0.0,
            atol=0.0,
            maxiter=24,
            damping=0.1,
            M=lambda R: R / d,
            x0=torch.zeros_like(B),
            check_finite=False,
        )
        indefinite = cg_solve(
            lambda v: -v,
            torch.ones(4, dtype=F64),
            rtol=0.0,
            atol=0.0,
            maxiter=3,
            check_finite=False,
        )
        nan = cg_solve(
            lambda v: v * float("nan"),
            torch.ones(4, dtype=F64),
            rtol=0.0,
            atol=0.0,
            maxiter=3,
            check_finite=False,
        )
    ref = torch.linalg.solve(A + 0.1 * torch.eye(16, dtype=F64), B)
    torch.testing.assert_close(res.x, ref, rtol=0, atol=1e-9)
    assert bool(torch.isfinite(res.x).all())
    assert res.statuses[1] is CGStatus.CONVERGED and int(res.iterations[1]) == 0
    assert res.matvecs == 25
    assert indefinite.status is CGStatus.NON_POSITIVE_CURVATURE
    assert nan.status is CGStatus.NON_FINITE
    assert torch.equal(nan.x, torch.zeros(4, dtype=F64))


# ---------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 8),
    k=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    log_cond=st.floats(0.0, 3.0),
    damping=st.sampled_from([0.0, 0.1]),
)
def test_random_spd_matches_solve(
    n: int, k: int, seed: int, log_cond: float, damping: float
) -> None:
    A = _spd(n, 1.0, 10.0**log_cond, seed)
    g = _gen(seed + 1)
    b = (
        torch.randn(n, dtype=F64, generator=g)
        if k == 0
        else torch.randn(n, k, dtype=F64, generator=g)
    )
    res = cg_solve(A, b, damping=damping, rtol=1e-10)
    assert res.status is CGStatus.CONVERGED
    ref = torch.linalg.solve(A + damping * torch.eye(n, dtype=F64), b)
    scale = float(torch.linalg.vector_norm(ref)) + 1e-300
    assert float(torch.linalg.vector_norm(res.x - ref)) <= 1e-7 * scale
    assert bool((res.iterations <= 3 * n).all())
    assert bool((res.residual_norm <= res.tolerance).all())
    assert bool(torch.isfinite(res.x).all())


def test_module_docstring_examples() -> None:
    result = doctest.testmod(natgrad.cg)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------- issue 10: the underflow fix
def _rank3_fisher(dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """A rank-3 Fisher-like PSD F = 1e-4·JᵀJ (n = 200) and a gradient-like b."""
    g = _gen(seed)
    J = torch.randn(3, 200, dtype=F64, generator=g)
    F = 1e-4 * J.T @ J
    b = torch.randn(200, dtype=F64, generator=g)
    return F.to(dtype), b.to(dtype)


# (dtype, seed, maxiter): the reproductions of issue 10, where the pre-fix solver kept
# iterating on rounding noise until pᵀ(F + 0.1I)p underflowed to 0 and reported
# NON_POSITIVE_CURVATURE (and natural_step a zero step).
UNDERFLOW_CASES = [(torch.float32, 1, 10), (torch.float64, 0, 40)]


@pytest.mark.parametrize(("dtype", "seed", "maxiter"), UNDERFLOW_CASES, ids=["f32", "f64"])
def test_fixed_mode_freezes_a_converged_column_instead_of_underflowing(
    dtype: torch.dtype, seed: int, maxiter: int
) -> None:
    F, b = _rank3_fisher(dtype, seed)
    res = cg_solve(F, b, damping=0.1, rtol=0.0, atol=0.0, maxiter=maxiter, check_finite=False)
    assert res.status is CGStatus.CONVERGED
    # Four distinct eigenvalues: CG is exact after 4 steps, and the column froze there.
    assert int(res.iterations) <= 5 and res.matvecs == maxiter
    eps = torch.finfo(dtype).eps
    assert float(res.residual_norm) <= eps * float(torch.linalg.vector_norm(b))
    ref = torch.linalg.solve(F.double() + 0.1 * torch.eye(200, dtype=F64), b.double())
    err = torch.linalg.vector_norm(res.x.double() - ref) / torch.linalg.vector_norm(ref)
    assert float(err) < 50 * eps


def test_underflow_fix_is_per_column_and_never_syncs() -> None:
    F, b = _rank3_fisher(torch.float32, 1)
    slow = torch.randn(200, dtype=torch.float32, generator=_gen(2))
    B = torch.stack([b, slow], 1)
    d = torch.logspace(0, 3, 200, dtype=torch.float32)  # column 1: far from converged

    def op(V: Tensor) -> Tensor:
        return torch.cat([F @ V[:, :1], d[:, None] * V[:, 1:]], 1)

    with NoHostSync():
        res = cg_solve(op, B, damping=0.1, rtol=0.0, atol=0.0, maxiter=10, check_finite=False)
    assert res.statuses == (CGStatus.CONVERGED, CGStatus.MAX_ITERATIONS)
    assert int(res.iterations[0]) <= 5 and int(res.iterations[1]) == 10


# ------------------------------------------------------ issue 10: scipy parity
def _hermitian(n: int, dtype: torch.dtype, seed: int) -> Tensor:
    g = _gen(seed)
    Z = torch.complex(
        torch.randn(n, n, dtype=F64, generator=g), torch.randn(n, n, dtype=F64, generator=g)
    )
    Q, _ = torch.linalg.qr(Z)
    A = Q @ torch.diag(torch.linspace(1.0, 20.0, n, dtype=F64).to(Q.dtype)) @ Q.conj().T
    return ((A + A.conj().T) / 2).to(dtype)


@pytest.mark.parametrize("rhs", ["vector", "block", "fixed"])
def test_complex_hermitian_matches_solve_and_scipy(rhs: str) -> None:
    A = _hermitian(20, torch.complex128, 20)
    g = _gen(21)
    b = torch.complex(
        torch.randn(20, 2, dtype=F64, generator=g), torch.randn(20, 2, dtype=F64, generator=g)
    )
    b = b[:, 0] if rhs != "block" else b
    if rhs == "fixed":
        res = cg_solve(A, b, rtol=0.0, atol=0.0, maxiter=60)
    else:
        res = cg_solve(A, b, rtol=1e-12)
    assert res.status is CGStatus.CONVERGED and res.x.dtype == torch.complex128
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
    assert res.residual_norm.dtype == F64
    if rhs == "vector":
        x_sp, info = scipy.sparse.linalg.cg(A.numpy(), b.numpy(), rtol=1e-12, atol=0.0)
        assert info == 0
        np.testing.assert_allclose(res.x.numpy(), x_sp, rtol=0, atol=1e-10)


def test_complex64_and_complex_numpy_operator() -> None:
    A = _hermitian(12, torch.complex128, 22)
    b = torch.complex(torch.ones(12, dtype=F64), torch.arange(12, dtype=F64))
    res = cg_solve(A.numpy(), b, rtol=1e-12)  # a complex numpy matrix keeps its imaginary part
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
    low = cg_solve(A.to(torch.complex64), b.to(torch.complex64), rtol=1e-5)
    assert low.status is CGStatus.CONVERGED
    torch.testing.assert_close(low.x, res.x.to(torch.complex64), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="A is complex.*b is real.*imaginary part"):
        cg_solve(A.numpy(), torch.ones(12, dtype=F64))


def test_atol_inf_stops_at_once_like_scipy() -> None:
    A = _spd(6, 1.0, 3.0, 23)
    b = torch.ones(6, dtype=F64)
    x0 = torch.full((6,), 0.5, dtype=F64)
    res = cg_solve(A, b, x0=x0, atol=float("inf"))
    x_sp, info = scipy.sparse.linalg.cg(A.numpy(), b.numpy(), x0=x0.numpy(), atol=np.inf)
    assert info == 0 and res.status is CGStatus.CONVERGED and int(res.iterations) == 0
    np.testing.assert_array_equal(res.x.numpy(), x_sp)


@pytest.mark.parametrize("mode", ["vector", "block", "fixed"])
def test_zero_rhs_returns_zero_whatever_x0(mode: str) -> None:
    A = _spd(5, 1.0, 3.0, 24)
    count = Counting(A)
    b = torch.zeros(5, dtype=F64) if mode != "block" else torch.zeros(5, 2, dtype=F64)
    x0 = torch.ones_like(b)
    rtol = 0.0 if mode == "fixed" else 1e-5
    res = cg_solve(count, b, x0=x0, rtol=rtol, maxiter=4)
    x_sp, info = scipy.sparse.linalg.cg(A.numpy(), np.zeros(5), x0=np.ones(5))
    assert info == 0 and not x_sp.any()
    assert torch.equal(res.x, torch.zeros_like(b)) and torch.equal(x0, torch.ones_like(b))
    assert all(s is CGStatus.CONVERGED for s in res.statuses)
    assert bool((res.iterations == 0).all())
    if mode != "fixed":
        assert count.calls == 0  # "at once": not even r₀ = b − A x0


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [None, -1e-3, float("nan"), "1e-5", True])
def test_invalid_tolerance_is_a_value_error(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number >= 0"):
        cg_solve(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a number >= 0"):
        CG(**{name: value})


def test_true_residual_decides_converged_after_a_long_solve() -> None:
    # float32, cond 1e4, rtol 1e-6: the recursive residual meets the tolerance after ~440
    # iterations while the true ‖b − Ax‖ is ~150× the tolerance (the pre-fix solver said
    # CONVERGED). Now the status is honest about the true residual.
    A = _spd(100, 1.0, 1e4, 0).float()
    b = torch.randn(100, dtype=F64, generator=_gen(1)).float()
    res = cg_solve(A, b, rtol=1e-6)
    true = torch.linalg.vector_norm((b - A @ res.x).double())
    assert bool(res.residual_checked)
    assert res.status is CGStatus.INACCURATE and not res.success
    assert float(true) > float(res.tolerance)
    torch.testing.assert_close(res.residual_norm.double(), true, rtol=1e-3, atol=0)
    with pytest.raises(CGError, match="CG inaccurate.*true ‖b − \\(A \\+ λI\\)x‖"):
        res.raise_if_failed()
    # A reachable tolerance converges, certified by the true residual.
    ok = cg_solve(A, b, rtol=1e-3)
    true_ok = torch.linalg.vector_norm((b - A @ ok.x).double())
    assert ok.status is CGStatus.CONVERGED and bool(ok.residual_checked)
    assert float(true_ok) <= float(ok.tolerance) * (1 + 1e-6)


def test_true_residual_check_restarts_columns_of_a_block() -> None:
    # Column 0: rtol = 1e-6 is out of float32's reach at cond 1e3 (two restarts, then
    # INACCURATE); column 1 converges and its true residual certifies it.
    A = _spd(30, 1.0, 1e3, 0).float()
    b = torch.randn(30, dtype=F64, generator=_gen(1)).float()
    B = torch.stack([b, A @ torch.ones(30)], 1)
    res = cg_solve(A, B, rtol=1e-6)
    assert res.statuses == (CGStatus.INACCURATE, CGStatus.CONVERGED)
    assert res.residual_checked.tolist() == [True, True]
    assert res.matvecs == int(res.iterations.max()) + 3  # one check, then one per restart
    true = torch.linalg.vector_norm((B - A @ res.x).double(), dim=0)
    torch.testing.assert_close(res.residual_norm.double(), true, rtol=1e-3, atol=0)
    assert float(true[0]) > float(res.tolerance[0])
    assert float(true[1]) <= float(res.tolerance[1]) * (1 + 1e-6)


# ------------------------------------------------------- the CG settings value
def test_cg_value_equals_cg_solve_and_is_frozen() -> None:
    case = CASES["poisson_2d"]
    solver = CG(rtol=1e-9, maxiter=200)
    a = solver.solve(case.A, case.b, damping=0.5)
    b = cg_solve(case.A, case.b, rtol=1e-9, maxiter=200, damping=0.5)
    assert torch.equal(a.x, b.x) and a.status is b.status is CGStatus.CONVERGED
    assert torch.equal(solver(case.A, case.b, damping=0.5).x, a.x)
    assert not solver.fixed_iterations and CG(rtol=0.0).fixed_iterations
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.rtol = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="maxiter must be"):
        CG(maxiter=0)


def test_vector_fast_path_equals_the_block_loop() -> None:
    # One vector on the CPU takes the scalar loop; as a (n, 1) block it takes the masked one.
    case = CASES["spd_ill_conditioned_jacobi"]
    M = _jacobi(case.A)
    seen: list[CGIterate] = []
    vec = cg_solve(case.A, case.b, rtol=1e-10, M=M, callback=seen.append)
    blk = cg_solve(case.A, case.b[:, None], rtol=1e-10, M=M)
    assert vec.status is blk.status is CGStatus.CONVERGED
    assert int(vec.iterations) == int(blk.iterations[0]) == len(seen)
    torch.testing.assert_close(vec.x, blk.x[:, 0], rtol=1e-12, atol=0)
    assert [it.iteration for it in seen] == list(range(1, len(seen) + 1))
    assert not bool(seen[-1].active) and all(bool(it.active) for it in seen[:-1])


def test_cg_error_is_a_solver_error() -> None:
    res = cg_solve(lambda v: -v, torch.ones(3, dtype=F64))
    with pytest.raises(SolverError) as info:
        res.raise_if_failed()
    assert isinstance(info.value, CGError) and info.value.result is res
    assert res.raise_if_failed(allow=("non_positive_curvature",)) is res


def test_matvec_module_docstring_examples_and_one_damping() -> None:
    result = doctest.testmod(natgrad.matvec)
    assert result.attempted > 0 and result.failed == 0
    A = _spd(4, 1.0, 2.0, 30)
    v = torch.randn(4, dtype=F64, generator=_gen(30))
    damped = natgrad.matvec.damp(lambda u: A @ u, 0.25)
    torch.testing.assert_close(damped(v), (A + 0.25 * torch.eye(4, dtype=F64)) @ v)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        natgrad.matvec.damp(lambda u: u, float("nan"))


def test_import_natgrad_does_not_load_scipy() -> None:
    # scipy.sparse costs ~0.5 s of import; as_matvec recognises scipy objects without it.
    code = "import sys, natgrad; print('scipy.sparse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 8),
    k=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
    fixed=st.booleans(),
    jacobi=st.booleans(),
)
def test_random_hermitian_matches_solve(
    n: int, k: int, seed: int, fixed: bool, jacobi: bool
) -> None:
    A = _hermitian(n, torch.complex128, seed)
    g = _gen(seed + 1)
    shape = (n,) if k == 0 else (n, k)
    b = torch.complex(
        torch.randn(shape, dtype=F64, generator=g), torch.randn(shape, dtype=F64, generator=g)
    )
    d = torch.diagonal(A).real.to(A.dtype)
    M = (lambda r: r / (d if r.ndim == 1 else d[:, None])) if jacobi else None
    res = cg_solve(A, b, rtol=0.0 if fixed else 1e-11, maxiter=4 * n, M=M)
    assert res.success
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=0, atol=1e-8)
