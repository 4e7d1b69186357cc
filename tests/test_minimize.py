"""Tests of natgrad.minimize against scipy.optimize.minimize on the same problems."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor

from natgrad.minimize import OptimizeError, OptimizeStatus, minimize

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def extended_rosenbrock(x: Tensor) -> Tensor:
    """Moré, Garbow & Hillstrom's extended Rosenbrock: n/2 independent 2-D Rosenbrocks."""
    odd, even = x[0::2], x[1::2]
    return (100 * (even - odd**2) ** 2 + (1 - odd) ** 2).sum()


def _ext_rosen_np(x: np.ndarray) -> tuple[float, np.ndarray]:
    odd, even = x[0::2], x[1::2]
    f = float(np.sum(100 * (even - odd**2) ** 2 + (1 - odd) ** 2))
    g = np.empty_like(x)
    g[0::2] = -400 * odd * (even - odd**2) - 2 * (1 - odd)
    g[1::2] = 200 * (even - odd**2)
    return f, g


def _ext_rosen_hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    odd, even = x[0::2], x[1::2]
    h11 = 1200 * odd**2 - 400 * even + 2
    h12 = -400 * odd
    out = np.empty_like(v)
    out[0::2] = h11 * v[0::2] + h12 * v[1::2]
    out[1::2] = h12 * v[0::2] + 200 * v[1::2]
    return out


def _rosen_start(n: int) -> np.ndarray:
    x0 = np.empty(n)
    x0[0::2], x0[1::2] = -1.2, 1.0
    return x0


def _logistic_problem(seed: int, n: int = 300, d: int = 8):
    g = _gen(seed)
    X = torch.randn(n, d, dtype=F64, generator=g) * torch.logspace(-1, 1, d, dtype=F64)
    w_true = torch.randn(d, dtype=F64, generator=g)
    y = (torch.rand(n, dtype=F64, generator=g) < torch.sigmoid(X @ w_true)).to(F64)
    lam = 1e-2

    def f(w: Tensor) -> Tensor:
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * lam * w @ w

    Xn, yn = X.numpy(), y.numpy()

    def f_np(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = Xn @ w
        val = np.mean(np.logaddexp(0, z) - yn * z) + 0.5 * lam * w @ w
        return float(val), Xn.T @ (1 / (1 + np.exp(-z)) - yn) / len(yn) + lam * w

    def hessp_np(w: np.ndarray, v: np.ndarray) -> np.ndarray:
        s = 1 / (1 + np.exp(-(Xn @ w)))
        return Xn.T @ (s * (1 - s) * (Xn @ v)) / len(yn) + lam * v

    return f, f_np, hessp_np, d


# ------------------------------------------------------------------- vs scipy
@pytest.mark.parametrize("n", [100, 10_000])
def test_extended_rosenbrock_no_more_iterations_than_scipy(n: int) -> None:
    x0 = _rosen_start(n)
    ref = scipy.optimize.minimize(
        _ext_rosen_np, x0, jac=True, hessp=_ext_rosen_hessp, method="trust-ncg",
        options={"gtol": 1e-8},
    )
    res = minimize(extended_rosenbrock, torch.tensor(x0), method="trust-ncg", gtol=1e-8)
    assert ref.success and res.success and res.status is OptimizeStatus.SUCCESS
    assert res.nit <= ref.nit
    torch.testing.assert_close(res.x, torch.ones(n, dtype=F64), rtol=0, atol=1e-8)
    assert float(res.grad.norm()) <= 1e-8
    assert res.nfev == res.njev == res.nit + 1  # one (f, ∇f) per trial point, plus x0


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
@pytest.mark.parametrize("seed", [0, 1])
def test_logistic_regression_same_optimum_as_scipy(method: str, seed: int) -> None:
    f, f_np, hessp_np, d = _logistic_problem(seed)
    # The reference: scipy's trust-ncg with a hand-written hessp (scipy's Newton-CG stops on
    # the step length, xtol, and is less accurate than ‖∇f‖ ≤ 1e-10).
    ref = scipy.optimize.minimize(
        f_np, np.zeros(d), jac=True, hessp=hessp_np, method="trust-ncg",
        options={"gtol": 1e-10},
    )
    res = minimize(f, torch.zeros(d, dtype=F64), method=method, gtol=1e-10)
    assert res.success, res.message
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=1e-8, atol=1e-8)
    # Same function (ours) at both points (scipy's numpy f rounds differently): ours is as
    # low, up to rounding.
    assert float(res.fun) <= float(f(torch.tensor(ref.x))) + 1e-14
    assert res.nhev > 0 and res.nit > 0
    # scipy's result fields, same meanings
    assert res.jac is res.grad and float(res.grad.norm()) <= 1e-10
    assert OptimizeStatus.code(res.status) == 0 == ref.status


def test_chained_rosenbrock_matches_scipy_iterations() -> None:
    n = 30
    x0 = _rosen_start(n)
    ref = scipy.optimize.minimize(
        scipy.optimize.rosen, x0, jac=scipy.optimize.rosen_der,
        hessp=scipy.optimize.rosen_hess_prod, method="trust-ncg",
    )

    def rosen(x: Tensor) -> Tensor:
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    res = minimize(rosen, torch.tensor(x0), gtol=1e-4)  # scipy's default gtol
    # The chained function's ~170 iterations wander through a curved valley, and their count
    # moves with the rounding of the machine's BLAS (≤ 172 on one machine, 175 on another,
    # scipy 172 on both): within 5 % of scipy here; the extended function above is exact.
    assert res.success and res.nit <= 1.05 * ref.nit
    torch.testing.assert_close(res.x, torch.tensor(ref.x), rtol=0, atol=1e-4)


def test_trust_ncg_reorthogonalizes_small_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    # Badly scaled logistic regression (columns 1e-2…1e2): with its CG residuals
    # reorthogonalised (the default up to REORTHOGONALIZE_MAX_N variables) trust-ncg reaches
    # the same optimum with far fewer Hessian products; above the limit it is plain CG.
    g = _gen(5)
    X = torch.randn(400, 20, dtype=F64, generator=g) * torch.logspace(-2, 2, 20, dtype=F64)
    y = (torch.rand(400, dtype=F64, generator=g) < 0.5).to(F64)

    def f(w: Tensor) -> Tensor:
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 5e-4 * w @ w

    w0 = torch.zeros(20, dtype=F64)
    auto = minimize(f, w0, gtol=1e-9)
    plain = minimize(f, w0, gtol=1e-9, reorthogonalize=False)
    assert auto.success and plain.success
    assert auto.nhev < 0.75 * plain.nhev, (auto.nhev, plain.nhev)
    # f is μ-strongly convex with μ ≥ 2·5e-4 (the L2 term), so ‖x − x*‖ ≤ ‖∇f(x)‖/μ for each:
    # a bound that holds on any BLAS, unlike an elementwise tolerance along the flat directions.
    mu = 1e-3
    bound = (auto.grad.norm() + plain.grad.norm()) / mu
    assert (auto.x - plain.x).norm() <= bound, ((auto.x - plain.x).norm(), bound)
    assert abs(auto.fun - plain.fun) <= 1e-12
    mod = importlib.import_module("natgrad.minimize")
    monkeypatch.setattr(mod, "REORTHOGONALIZE_MAX_N", 19)
    assert minimize(f, w0, gtol=1e-9).nhev == plain.nhev
    assert minimize(f, w0, gtol=1e-9, reorthogonalize=True).nhev == auto.nhev


# -------------------------------------------------------- structure and options
def test_dict_x0_least_squares_matches_lstsq() -> None:
    g = _gen(3)
    A = torch.randn(40, 6, dtype=F64, generator=g)
    b = torch.randn(40, dtype=F64, generator=g)

    def f(p: dict[str, Tensor]) -> Tensor:
        return 0.5 * ((A[:, :4] @ p["w"] + A[:, 4:] @ p["v"].reshape(-1) - b) ** 2).sum()

    x0 = {"w": torch.zeros(4, dtype=F64), "v": torch.zeros(1, 2, dtype=F64)}
    res = minimize(f, x0, method="newton-cg", gtol=1e-10)
    ref = torch.linalg.lstsq(A, b).solution
    assert res.success and set(res.x) == {"w", "v"} and res.x["v"].shape == (1, 2)
    torch.testing.assert_close(torch.cat([res.x["w"], res.x["v"].reshape(-1)]), ref)
    assert torch.equal(x0["w"], torch.zeros(4, dtype=F64))  # x0 not modified


def test_user_hvp_is_used_and_counted() -> None:
    calls = []

    def hvp(x: Tensor, v: Tensor) -> Tensor:
        calls.append(1)
        return torch.tensor([2.0, 20.0], dtype=F64) * v

    def f(x: Tensor) -> Tensor:
        return x[0] ** 2 + 10 * x[1] ** 2

    res = minimize(f, torch.tensor([3.0, -1.0], dtype=F64), hvp=hvp, gtol=1e-12)
    assert res.success and len(calls) == res.nhev > 0
    torch.testing.assert_close(res.x, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)


def test_preconditioner_on_badly_scaled_quadratic_reduces_hvps() -> None:
    d = torch.logspace(-3, 3, 20, dtype=F64)

    def f(x: Tensor) -> Tensor:
        return 0.5 * (d * x * x).sum() - x.sum()

    x0 = torch.zeros(20, dtype=F64)
    plain = minimize(f, x0, gtol=1e-9, initial_trust_radius=1e4, max_trust_radius=1e5)
    pre = minimize(f, x0, gtol=1e-9, M=lambda r: r / d, initial_trust_radius=1e4,
                   max_trust_radius=1e5)
    assert plain.success and pre.success
    torch.testing.assert_close(pre.x, 1 / d)
    assert pre.nhev < plain.nhev


def test_indefinite_start_escapes_saddle() -> None:
    # f = x⁴/4 − x²/2 + y²: x = 0 is a saddle (Hessian diag(−1, 2)) with g ≠ 0 nearby.
    def f(x: Tensor) -> Tensor:
        return x[0] ** 4 / 4 - x[0] ** 2 / 2 + x[1] ** 2

    for method in ("trust-ncg", "newton-cg"):
        res = minimize(f, torch.tensor([1e-3, 1.0], dtype=F64), method=method, gtol=1e-10)
        assert res.success, method
        torch.testing.assert_close(res.x.abs(), torch.tensor([1.0, 0.0], dtype=F64),
                                   rtol=0, atol=1e-8)


def test_maxiter_and_callback_statuses() -> None:
    x0 = torch.tensor(_rosen_start(4))
    res = minimize(extended_rosenbrock, x0, maxiter=3)
    assert res.status is OptimizeStatus.MAX_ITERATIONS and res.nit == 3 and not res.success
    assert OptimizeStatus.code(res.status) == 1  # scipy's "maxiter" status
    with pytest.raises(OptimizeError, match="Maximum number of iterations"):
        res.raise_if_failed()
    seen: list[Tensor] = []

    def cb(x: Tensor) -> bool:
        seen.append(x)
        return len(seen) == 2

    res = minimize(extended_rosenbrock, x0, method="newton-cg", callback=cb)
    assert res.status is OptimizeStatus.CALLBACK and res.nit == 2
    torch.testing.assert_close(seen[-1], res.x)

    def stop(x: Tensor) -> None:
        raise StopIteration

    assert minimize(extended_rosenbrock, x0, callback=stop).status is OptimizeStatus.CALLBACK


def test_already_optimal_start_does_no_iteration() -> None:
    res = minimize(extended_rosenbrock, torch.ones(4, dtype=F64))
    assert res.success and res.nit == 0 and res.nhev == 0 and res.nfev == 1


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors() -> None:
    x0 = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="fun must return a scalar"):
        minimize(lambda x: x * 2, x0)
    with pytest.raises(ValueError, match="not finite at x0"):
        minimize(lambda x: (x.log()).sum(), x0)
    with pytest.raises(ValueError, match="method"):
        minimize(lambda x: (x**2).sum(), x0, method="bfgs")
    with pytest.raises(ValueError, match="initial_trust_radius"):
        minimize(lambda x: (x**2).sum(), x0, initial_trust_radius=-1.0)
    with pytest.raises(ValueError, match="max_trust_radius"):
        minimize(lambda x: (x**2).sum(), x0, initial_trust_radius=10.0, max_trust_radius=1.0)
    with pytest.raises(ValueError, match="eta"):
        minimize(lambda x: (x**2).sum(), x0, eta=0.5)
    with pytest.raises(ValueError, match="maxiter"):
        minimize(lambda x: (x**2).sum(), x0, maxiter=2.5)
    with pytest.raises(ValueError, match="gtol"):
        minimize(lambda x: (x**2).sum(), x0, gtol=-1.0)
    with pytest.raises(TypeError, match="x0"):
        minimize(lambda x: (x**2).sum(), [0.0, 1.0])
    with pytest.raises(TypeError, match="floating"):
        minimize(lambda x: (x**2).sum(), torch.zeros(3, dtype=torch.int64))


def test_doctests() -> None:
    assert doctest.testmod(importlib.import_module("natgrad.minimize"), raise_on_error=False).failed == 0
