"""natgrad benchmarks: one gradient (the unit), one curvature-vector product per operator,
CG of 10 and 25 iterations, scipy's CG on ``to_scipy()``, and curvlinops' GGN as a peer.

The network is a tanh MLP Gaussian policy (``bench_problems``); every operator is built on the
same parameters and states:

* ``grad``: ``flat_grad`` of the TRPO surrogate ``mean(exp(log π − log π_old) · A)``;
* ``fisher_setup`` / ``fvp_fisher``: ``fisher_operator`` (closed-form ``JᵀF_outJ``, cached
  linearisation) construction and one product;
* ``kl_setup`` / ``fvp_kl_2bp``: ``kl_hessian_operator``, the double backprop of the mean KL
  (what SB3-contrib does), construction (a ``create_graph`` gradient) and one product;
* ``hvp_fwd_rev``: ``hessian_operator`` of the mean KL (forward-over-reverse), one product;
* ``cg10`` / ``cg25``: ``cg_solve`` on the damped Fisher, fixed iterations (operator built);
* ``fisher_cg15_graphed`` (CUDA only): Fisher set-up + 15 CG iterations recorded as one CUDA
  graph (gradient and states in static buffers), replayed;
* ``scipy_cg10``: ``scipy.sparse.linalg.cg`` on ``fisher.to_scipy()``, 10 iterations (CPU);
* ``ggn_natgrad`` / ``ggn_curvlinops``: one GGN product of the mean network under the mean
  squared error, natgrad's ``ggn_operator`` and curvlinops' ``GGNLinearOperator``.
* ``test_cg_overhead_{natgrad,scipy}[n]`` (CPU, n = 50, 1000, 10000; not per policy case):
  200 tolerance-mode CG iterations on a diagonal operator, natgrad's ``cg_solve`` and
  ``scipy.sparse.linalg.cg`` in the same run (``cg_overhead.py`` prints the ratio per
  iteration; issue 10's goal is ≤ 3).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from bench_problems import make_policy_problem
from cg_overhead import SIZES, diagonal_problem

from natgrad.cg import cg_solve
from natgrad.curvature import (
    fisher_operator,
    ggn_operator,
    hessian_operator,
    kl_hessian_operator,
)
from natgrad.params import ParamSpace, flat_grad

DAMPING = 0.1


@pytest.fixture
def problem(case, device):
    return make_policy_problem(case, device)


def _vector(prob, seed=1):
    n = ParamSpace(prob.params).numel
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(prob.device)


@pytest.mark.huge_ok
def test_grad(bench, problem):
    bench("grad", lambda: flat_grad(problem.surrogate, problem.params))


def test_fisher_setup(bench, problem):
    p = problem
    bench("fisher_setup", lambda: fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian"))


@pytest.mark.huge_ok
def test_fvp_fisher(bench, problem):
    p = problem
    op = fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian")
    v = _vector(p)
    out = bench("fvp_fisher", lambda: op @ v)
    ref = kl_hessian_operator(p.mean_kl, p.params, p.obs) @ v
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_kl_setup(bench, problem):
    p = problem
    bench("kl_setup", lambda: kl_hessian_operator(p.mean_kl, p.params, p.obs))


@pytest.mark.huge_ok
def test_fvp_kl_double_backprop(bench, problem):
    p = problem
    op = kl_hessian_operator(p.mean_kl, p.params, p.obs)
    v = _vector(p)
    bench("fvp_kl_2bp", lambda: op @ v)


def test_hvp_forward_over_reverse(bench, problem):
    p = problem
    op = hessian_operator(p.mean_kl, p.params, p.obs, method="forward_over_reverse")
    v = _vector(p)
    bench("hvp_fwd_rev", lambda: op @ v)


@pytest.mark.parametrize("iters", [10, 25])
def test_cg(bench, problem, iters):
    p = problem
    op = fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian")
    _, g = flat_grad(p.surrogate, p.params)

    def solve():
        return cg_solve(
            op, g, damping=DAMPING, rtol=0.0, atol=0.0, maxiter=iters, check_finite=False
        )

    res = bench(f"cg{iters}", solve)
    assert res.matvecs == iters


@pytest.mark.huge_ok
def test_fisher_cg_graphed(bench, problem, device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    p = problem
    _, g = flat_grad(p.surrogate, p.params)
    g = g.detach().clone()

    def setup_and_solve():
        op = fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian")
        return cg_solve(op, g, damping=DAMPING, rtol=0.0, atol=0.0, maxiter=15, check_finite=False)

    eager = setup_and_solve().x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            setup_and_solve()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = setup_and_solve()
    bench("fisher_cg15_graphed", graph.replay)
    assert torch.allclose(out.x, eager, rtol=1e-4, atol=1e-6 * float(eager.abs().max()))


def test_scipy_cg(bench, problem, device):
    if device != "cpu":
        pytest.skip("scipy's CG runs on the host: a CPU peer only")
    p = problem
    op = fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian").damped(DAMPING)
    sp = op.to_scipy()
    _, g = flat_grad(p.surrogate, p.params)
    b = g.double().numpy()

    def solve():
        return spla.cg(sp, b, rtol=0.0, atol=0.0, maxiter=10)

    x, _ = bench("scipy_cg10", solve)
    ours = cg_solve(op, g, rtol=0.0, atol=0.0, maxiter=10, check_finite=False).x
    assert np.allclose(x, ours.double().numpy(), rtol=1e-2, atol=1e-3 * np.abs(x).max())


def _ggn_operands(p):
    params = {k: v for k, v in p.params.items() if k != "log_std"}
    ours = ggn_operator(p.mean_fn, params, p.obs, output_hessian="mse")
    v = _vector(p)[: ours.shape[0]].contiguous()
    return ours, v


def test_ggn_natgrad(bench, problem):
    ours, v = _ggn_operands(problem)
    bench("ggn_natgrad", lambda: ours @ v)


def test_ggn_curvlinops(bench, problem):
    curvlinops = pytest.importorskip("curvlinops")
    p = problem
    ours, v = _ggn_operands(p)
    theirs = curvlinops.GGNLinearOperator(
        p.net,
        torch.nn.MSELoss(),
        list(p.net.parameters()),
        [(p.obs, p.targets)],
        check_deterministic=False,
    )
    out = bench("ggn_curvlinops", lambda: theirs @ v)
    ref = ours @ v  # the same matrix (mean squared error: H_out = 2 / (B·d) I)
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("n", SIZES)
def test_cg_overhead_natgrad(benchmark, n):
    prob = diagonal_problem(n)
    res = benchmark(prob.natgrad_solve)
    assert res.matvecs == prob.iters  # every round does the same 200 iterations


@pytest.mark.parametrize("n", SIZES)
def test_cg_overhead_scipy(benchmark, n):
    prob = diagonal_problem(n)
    _, info = benchmark(prob.scipy_solve)
    assert info == prob.iters
