"""The CPU fast path of fixed-iteration CG: the same bits as the masked loop, or a hand-over.

:func:`natgrad.cg_loops.fixed_vector_cg` must reproduce :func:`natgrad.cg_loops.block_cg`
(``fixed=True``) to the bit whenever it finishes, and give up (``None``) on every kind of
iteration it does not handle, so that :meth:`natgrad.cg.CG.solve` returns exactly what the
masked loop returns in every case.
"""

from __future__ import annotations

import math

import pytest
import torch

from natgrad.cg import CG
from natgrad.cg_loops import CODE, block_cg, fixed_vector_cg
from natgrad.cuda_graph import NoHostSync


def _spd(n: int, dtype: torch.dtype, seed: int, cond: float = 1e3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return ((q * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T).to(dtype)


def _reference(mv, b: torch.Tensor, maxiter: int):
    bnorm = torch.linalg.vector_norm(b, dim=0)
    return block_cg(mv, None, b, None, bnorm, torch.zeros_like(bnorm), maxiter, None, True)


def _assert_same_run(a, b) -> None:
    for name in ("x", "r", "rnorm", "code", "iterations", "direction", "curvature", "checked"):
        u, v = getattr(a, name), getattr(b, name)
        assert u.dtype == v.dtype and u.shape == v.shape, name
        assert torch.equal(u, v), name  # bit for bit
    assert a.matvecs == b.matvecs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maxiter", [1, 7, 25])
def test_ordinary_iterations_give_the_masked_loops_bits(dtype, maxiter):
    A = _spd(60, dtype, seed=maxiter)
    b = torch.randn(60, dtype=dtype, generator=torch.Generator().manual_seed(1))
    fast = fixed_vector_cg(lambda v: A @ v, b, torch.linalg.vector_norm(b, dim=0), maxiter)
    assert fast is not None and int(fast.code) == CODE["MAX_ITERATIONS"]
    _assert_same_run(fast, _reference(lambda v: A @ v, b, maxiter))
    # and it is CG: the residual it carries is b − A x up to rounding
    true_r = b.double() - A.double() @ fast.x.double()
    assert torch.allclose(fast.r.double(), true_r, atol=1e-3 if dtype == torch.float32 else 1e-10)


def _indefinite(v: torch.Tensor) -> torch.Tensor:
    d = torch.linspace(-1.0, 2.0, v.shape[0], dtype=v.dtype)
    return d * v


def _nan_in_one_entry(v: torch.Tensor) -> torch.Tensor:
    w = torch.ones_like(v)
    w[5] = math.nan
    return w * v


@pytest.mark.parametrize(
    "case",
    ["negative_curvature", "converges_early", "zero_b", "nan_operator", "inf_b"],
)
def test_every_other_iteration_hands_over_and_solve_returns_the_masked_result(case):
    dtype = torch.float64
    b = torch.randn(20, dtype=dtype, generator=torch.Generator().manual_seed(2))
    maxiter = 30
    A = _spd(20, dtype, seed=5, cond=10.0)  # 20 distinct eigenvalues: exact in ≤ 20 steps
    operators = {
        "negative_curvature": _indefinite,
        "converges_early": lambda v: A @ v,
        "zero_b": lambda v: 2.0 * v,
        "nan_operator": _nan_in_one_entry,
        "inf_b": lambda v: 2.0 * v,
    }
    op = operators[case]
    if case == "zero_b":
        b = torch.zeros_like(b)
    elif case == "inf_b":
        b[3] = math.inf
    bnorm = torch.linalg.vector_norm(b, dim=0)
    assert fixed_vector_cg(op, b, bnorm, maxiter) is None
    reference = _reference(op, b, maxiter)
    assert int(reference.code) != CODE["MAX_ITERATIONS"]  # the case is what it claims
    solver = CG(rtol=0.0, atol=0.0, maxiter=maxiter, check_finite=False)
    got = solver.solve(op, b)
    assert torch.equal(got.x, reference.x) and torch.equal(got.status_code, reference.code)
    assert torch.equal(got.iterations, reference.iterations)
    assert torch.equal(got.direction, reference.direction)


def test_solve_uses_the_fast_path_only_where_it_applies(monkeypatch):
    import natgrad.cg as cg_module

    used: list[bool] = []
    real = cg_module.fixed_vector_cg

    def spy(*args, **kwargs):
        used.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(cg_module, "fixed_vector_cg", spy)
    A = _spd(30, torch.float64, seed=7)
    b = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fixed = CG(rtol=0.0, atol=0.0, maxiter=10)
    x = fixed.solve(A, b).x
    assert used == [True]
    assert torch.equal(x, _reference(lambda v: A @ v, b, 10).x)
    for other in (
        lambda: fixed.solve(A, torch.stack([b, b], 1)),  # a block
        lambda: fixed.solve(A, b, x0=torch.ones_like(b)),  # a start point
        lambda: CG(rtol=0.0, atol=0.0, maxiter=10, M=torch.eye(30, dtype=b.dtype)).solve(A, b),
        lambda: CG(rtol=0.0, atol=0.0, maxiter=10, callback=lambda it: None).solve(A, b),
        lambda: CG(rtol=1e-8, maxiter=10).solve(A, b),  # tolerance mode
    ):
        other()
    quiet = CG(rtol=0.0, atol=0.0, maxiter=10, check_finite=False)
    with NoHostSync():  # recording a CUDA graph, or checking that nothing syncs
        y = quiet.solve(A, b).x
    assert torch.equal(y, x)
    assert used == [True]
