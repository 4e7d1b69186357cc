"""Curvature benchmarks outside RL (issue 10): HVP methods and streamed operators.

Problems from ``curvature_problems`` (logistic regression N×50 with badly scaled columns,
a 64-32-32-10 tanh MLP under cross-entropy; float64, ``N = BENCH_CURV_N``, default 2,000):

* ``hvp[<method>]``: one Hessian-vector product, ``hessian_operator(method=...)`` for every
  method and ``hand`` (the hand-written double-backprop HVP, the reference);
* ``value_grad_hessian``: the set-up (one forward + one ``create_graph`` backward);
* ``streamed[<op>-<k>]``: one product of the full-data operator streamed over ``k`` batches
  (``data=``), against ``k = 1`` (the one-batch operator on all the data);
* ``test_default_hvp_within_1_2x_of_hand_written``: the issue's goal, as a check (interleaved
  rounds, min of each; run it on a quiet machine).

Run::

    python -m pytest bench/test_bench_curvature.py --benchmark-only --benchmark-group-by=func
    python -m pytest bench/test_bench_curvature.py -k within -s -p no:randomly  # the 1.2x goal
    BENCH_CURV_N=200 python -m pytest bench/test_bench_curvature.py -q   # quick check

(``--benchmark-only`` skips the 1.2× check, which times interleaved rounds itself.)
"""

from __future__ import annotations

import time

import pytest
import torch
from curvature_problems import PROBLEMS, hand_hvp, make_problem

from natgrad.curvature import (
    HESSIAN_METHODS,
    fisher_operator,
    ggn_operator,
    hessian_operator,
    value_grad_hessian,
)


@pytest.fixture(params=PROBLEMS)
def problem(request):
    return make_problem(request.param)


def _vector(problem):
    return torch.randn(problem.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _hvp(problem, method):
    if method == "hand":
        return hand_hvp(problem)
    return hessian_operator(problem.loss, problem.params, problem.x, problem.y, method=method)


@pytest.mark.parametrize("method", ["hand", *HESSIAN_METHODS])
def test_hvp(benchmark, problem, method):
    mv, v = _hvp(problem, method), _vector(problem)
    reference = hand_hvp(problem)(v)
    torch.testing.assert_close(mv(v), reference, rtol=1e-9, atol=1e-12)
    benchmark.extra_info.update(problem=problem.name, method=method, n=problem.n)
    benchmark(mv, v)


def test_value_grad_hessian(benchmark, problem):
    p = problem
    benchmark.extra_info.update(problem=p.name)
    benchmark(lambda: value_grad_hessian(p.loss, p.params, p.x, p.y))


def _streamed(problem, which, k):
    p = problem
    data = p.batches(k) if k > 1 else None
    args = () if data is not None else (p.x, p.y)
    if which == "hessian":
        return hessian_operator(p.loss, p.params, *args, data=data)
    if p.model is None:
        pytest.skip("the GGN / Fisher need a model with logits: mlp only")
    if which == "ggn":
        return ggn_operator(p.model, p.params, *args, data=data, output_hessian="cross_entropy")
    return fisher_operator(p.model, p.params, *args, data=data, family="categorical")


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("which", ["hessian", "ggn", "fisher"])
def test_streamed(benchmark, problem, which, k):
    op, v = _streamed(problem, which, k), _vector(problem)
    benchmark.extra_info.update(problem=problem.name, op=which, batches=k)
    benchmark(op.matvec, v)


def _min_time(fns, v, rounds=200, inner=5):
    best = [float("inf")] * len(fns)
    for _ in range(rounds):  # interleaved: load spikes hit every method alike
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(v)
            best[i] = min(best[i], (time.perf_counter() - t0) / inner)
    return best


def test_default_hvp_within_1_2x_of_hand_written(problem):
    torch.set_num_threads(1)
    v = _vector(problem)
    hand, default = _min_time([hand_hvp(problem), _hvp(problem, "auto").matvec], v)
    print(
        f"\n{problem.name}: hand {hand * 1e3:.4f} ms, auto {default * 1e3:.4f} ms, "
        f"ratio {default / hand:.3f}"
    )
    assert default <= 1.2 * hand
