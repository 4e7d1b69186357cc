"""Outer iterations and Hessian-vector products of trust-ncg against trust-krylov (no timing).

Problems: ``bench/optim_vs_peers.py``'s ``rosen100`` (extended Rosenbrock), ``logreg`` and
``lstsq``; the chained Rosenbrock function (``scipy.optimize.rosen``, n = 100, start
(−1.2, 1, …): indefinite Hessians on the way); and a 2-16-1 tanh MLP least-squares fit
(65 parameters, indefinite Hessian, natgrad only) from four random starts. scipy runs with
its numpy ``hessp``, natgrad with autograd; every method gets ``gtol = 1e-8`` (MLP: 1e-6).
Counts do not depend on the machine's load; wall time is not measured here.

Usage::

    python bench/trust_krylov_counts.py
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch
from optim_vs_peers import Problem, logreg, lstsq, rosen

import natgrad

METHODS = ("trust-ncg", "trust-krylov")


def chained_rosen(n: int = 100) -> Problem:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(scipy.optimize.rosen(x)), scipy.optimize.rosen_der(x)

    return Problem(f"chained{n}", f, fg, scipy.optimize.rosen_hess_prod,
                   np.tile([-1.2, 1.0], n // 2))


def mlp(seed: int, hidden: int = 16):
    """``½ mean (MLP(x) − y)²`` of a 2-``hidden``-1 tanh MLP on 200 points, flat weights."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 2, dtype=torch.float64, generator=g)
    y = torch.sin(3 * X[:, 0]) * X[:, 1]
    h = hidden

    def f(w: torch.Tensor) -> torch.Tensor:
        W1, b1, W2 = w[: 2 * h].view(h, 2), w[2 * h : 3 * h], w[3 * h : 4 * h]
        return 0.5 * ((torch.tanh(X @ W1.T + b1) @ W2 + w[4 * h] - y) ** 2).mean()

    return f, torch.randn(4 * h + 1, dtype=torch.float64, generator=g) * 0.5


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'problem':>10} {'method':<13} {'scipy nit':>9} {'nhev':>6}      "
          f"{'natgrad nit':>11} {'nhev':>6}")
    for p in (rosen(100), logreg(), lstsq(), chained_rosen(100)):
        for m in METHODS:
            s = scipy.optimize.minimize(p.fg, p.x0, jac=True, hessp=p.hessp, method=m,
                                        options={"gtol": 1e-8, "maxiter": 200 * len(p.x0)})
            r = natgrad.minimize(p.f, torch.tensor(p.x0), method=m, gtol=1e-8)
            print(f"{p.name:>10} {m:<13} {s.nit:>9} {s.nhev:>6} {'' if s.success else 'FAIL':<4} "
                  f"{r.nit:>11} {r.nhev:>6} {'' if r.success else 'FAIL'}", flush=True)
    for seed in range(4):
        f, w0 = mlp(seed)
        for m in METHODS:
            r = natgrad.minimize(f, w0, method=m, gtol=1e-6, maxiter=5000)
            print(f"{'mlp65 s' + str(seed):>10} {m:<13} {'':>9} {'':>6}      {r.nit:>11} "
                  f"{r.nhev:>6} {'' if r.success else 'FAIL'} f = {float(r.fun):.2e}", flush=True)


if __name__ == "__main__":
    main()
