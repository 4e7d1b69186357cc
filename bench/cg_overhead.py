"""Per-iteration overhead of ``natgrad.cg_solve`` against ``scipy.sparse.linalg.cg``.

The operator is a diagonal (one elementwise multiply), so the time per iteration is the
solver's own overhead, not the matvec. Both solvers run in tolerance mode on the same
float64 problem (eigenvalues log-spaced in [1, 1e6], ``rtol=1e-12``) for exactly ``iters``
iterations (the problem does not converge sooner), in the same process, interleaved, one
torch thread. Issue 10's goal: natgrad ≤ 3× scipy for n ≤ 1e4.

Run (on a quiet machine)::

    python bench/cg_overhead.py                 # n = 50, 1000, 10000
    python bench/cg_overhead.py --n 50 --iters 20 --repeats 3   # a smoke test
    python bench/cg_overhead.py --fixed --n 5126 --iters 25   # fixed-iteration mode (TRPO's)

``--fixed`` times natgrad's fixed-iteration mode instead (``rtol = atol = 0``, float32, as
TRPO runs it): the masked loop ``natgrad.cg_loops.block_cg`` against what ``CG.solve`` runs
for one CPU vector (``fixed_vector_cg``, the same bits).

The pytest-benchmark cases ``test_cg_overhead_{natgrad,scipy}`` in ``test_bench_natgrad.py``
time the same solves.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg as spla
import torch

import natgrad
from natgrad.cg_loops import block_cg

SIZES = (50, 1000, 10000)
RTOL = 1e-12


@dataclass(frozen=True)
class DiagonalProblem:
    """``diag(d) x = b`` in torch and numpy, and the two solves of ``iters`` iterations."""

    d: torch.Tensor
    b: torch.Tensor
    iters: int

    def natgrad_solve(self) -> natgrad.CGResult:
        d = self.d
        return natgrad.cg_solve(lambda v: d * v, self.b, rtol=RTOL, maxiter=self.iters)

    def scipy_solve(self) -> tuple[np.ndarray, int]:
        d = self.d.numpy()
        n = d.shape[0]
        op = spla.LinearOperator((n, n), matvec=lambda v: d * v, dtype=np.float64)
        return spla.cg(op, self.b.numpy(), rtol=RTOL, maxiter=self.iters)


def diagonal_problem(n: int, iters: int = 200, seed: int = 0) -> DiagonalProblem:
    """A float64 diagonal SPD problem that needs more than ``iters`` CG iterations."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.logspace(0, 6, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    b = torch.randn(n, dtype=torch.float64, generator=gen)
    return DiagonalProblem(d, b, iters)


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int, iters: int = 200, repeats: int = 20) -> tuple[float, float]:
    """Best-of-``repeats`` seconds per iteration (natgrad, scipy), interleaved runs."""
    prob = diagonal_problem(n, iters)
    ours = prob.natgrad_solve()
    _, info = prob.scipy_solve()
    if ours.matvecs != iters or info != iters:  # both must do exactly `iters` iterations
        raise RuntimeError(f"n={n}: natgrad {ours.matvecs} matvecs, scipy info={info}")
    t_ours = t_scipy = float("inf")
    for _ in range(repeats):
        t_ours = min(t_ours, _best(prob.natgrad_solve, 1))
        t_scipy = min(t_scipy, _best(prob.scipy_solve, 1))
    return t_ours / iters, t_scipy / iters


def measure_fixed(n: int, iters: int = 25, repeats: int = 20) -> tuple[float, float]:
    """Best-of-``repeats`` seconds per iteration of fixed-iteration CG (masked, fast path)."""
    prob = diagonal_problem(n, iters)
    d, b = prob.d.float(), prob.b.float()
    bnorm = torch.linalg.vector_norm(b, dim=0)
    solver = natgrad.CG(rtol=0.0, atol=0.0, maxiter=iters)

    def masked() -> object:
        return block_cg(lambda v: d * v, None, b, None, bnorm, bnorm * 0, iters, None, True)

    def fast() -> object:
        return solver.solve(lambda v: d * v, b)

    if not torch.equal(masked().x, fast().x):
        raise RuntimeError("the fast path and the masked loop disagree")
    t_masked = t_fast = float("inf")
    for _ in range(repeats):
        t_masked = min(t_masked, _best(masked, 1))
        t_fast = min(t_fast, _best(fast, 1))
    return t_masked / iters, t_fast / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fixed", action="store_true", help="fixed-iteration mode instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fixed:
        print(f"{'n':>7} {'masked µs/it':>13} {'fast µs/it':>11} {'ratio':>6}")
        for n in args.n:
            masked, fast = measure_fixed(n, args.iters, args.repeats)
            print(f"{n:>7} {masked * 1e6:>13.1f} {fast * 1e6:>11.1f} {masked / fast:>6.2f}")
        return
    print(f"{'n':>7} {'natgrad µs/it':>14} {'scipy µs/it':>12} {'ratio':>6}   (goal ≤ 3)")
    for n in args.n:
        ours, theirs = measure(n, args.iters, args.repeats)
        print(f"{n:>7} {ours * 1e6:>14.1f} {theirs * 1e6:>12.1f} {ours / theirs:>6.2f}")


if __name__ == "__main__":
    main()
