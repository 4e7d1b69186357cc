"""natgrad.minimize vs scipy.optimize and torchmin on the same problems, side by side.

Problems (float64):

* ``logreg``: L2-regularised logistic regression, N = 2000, D = 50, column scales
  log-spaced in 1e-2 … 1e2, λ = 1e-3 (the speed target of issue 11: natgrad
  ``trust-ncg`` reaches f − f* ≤ 1e-10 in no more wall time than scipy ``trust-ncg`` with
  a hand-written numpy ``hessp``);
* ``rosen100`` / ``rosen10000``: the extended Rosenbrock function (Moré, Garbow &
  Hillstrom), start (−1.2, 1, …);
* ``lstsq``: ½‖Ax − b‖², A 1000 × 200 with column scales 1e-1 … 1e1.

Methods: scipy ``trust-ncg``, ``trust-krylov`` and ``Newton-CG`` (numpy f, ∇f and a
hand-written ``hessp``), torchmin ``trust-ncg`` and ``newton-cg`` (autograd; ``pip install
pytorch-minimize``), natgrad ``trust-ncg``, ``trust-krylov`` and ``newton-cg`` (autograd).
Each row: iterations, Hessian-vector products, median wall time over ``--repeats`` (after
one warm-up), the final ‖∇f‖ and f − f* (f* from a tight natgrad run). Every method gets
the same ``--gtol``.

Usage (the measurement for the issue: one thread, quiet machine)::

    python bench/optim_vs_peers.py --threads 1 --repeats 7
    python bench/optim_vs_peers.py --problems logreg --repeats 3 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from threadpoolctl import threadpool_limits  # ships with scikit-learn / scipy users' stacks
from torch import Tensor

import natgrad


@dataclass
class Problem:
    name: str
    f: Callable[[Tensor], Tensor]  # torch
    fg: Callable[[np.ndarray], tuple[float, np.ndarray]]  # numpy value and gradient
    hessp: Callable[[np.ndarray, np.ndarray], np.ndarray]  # numpy Hessian-vector product
    x0: np.ndarray


def logreg(n: int = 2000, d: int = 50, lam: float = 1e-3, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, d, dtype=torch.float64)
    X = torch.randn(n, d, dtype=torch.float64, generator=g) * scales
    w = torch.randn(d, dtype=torch.float64, generator=g) / scales
    y = (torch.rand(n, dtype=torch.float64, generator=g) < torch.sigmoid(X @ w)).double()
    Xn, yn = X.numpy(), y.numpy()

    def f(w: Tensor) -> Tensor:
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * lam * (w @ w)

    def fg(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = Xn @ w
        s = 1.0 / (1.0 + np.exp(-z))
        val = np.mean(np.logaddexp(0.0, z) - yn * z) + 0.5 * lam * (w @ w)
        return float(val), Xn.T @ (s - yn) / n + lam * w

    def hessp(w: np.ndarray, v: np.ndarray) -> np.ndarray:
        s = 1.0 / (1.0 + np.exp(-(Xn @ w)))
        return Xn.T @ (s * (1 - s) * (Xn @ v)) / n + lam * v

    return Problem("logreg", f, fg, hessp, np.zeros(d))


def rosen(n: int) -> Problem:
    def f(x: Tensor) -> Tensor:
        odd, even = x[0::2], x[1::2]
        return (100 * (even - odd**2) ** 2 + (1 - odd) ** 2).sum()

    def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
        odd, even = x[0::2], x[1::2]
        g = np.empty_like(x)
        g[0::2] = -400 * odd * (even - odd**2) - 2 * (1 - odd)
        g[1::2] = 200 * (even - odd**2)
        return float(np.sum(100 * (even - odd**2) ** 2 + (1 - odd) ** 2)), g

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        odd, even = x[0::2], x[1::2]
        out = np.empty_like(v)
        h12 = -400 * odd
        out[0::2] = (1200 * odd**2 - 400 * even + 2) * v[0::2] + h12 * v[1::2]
        out[1::2] = h12 * v[0::2] + 200 * v[1::2]
        return out

    x0 = np.empty(n)
    x0[0::2], x0[1::2] = -1.2, 1.0
    return Problem(f"rosen{n}", f, fg, hessp, x0)


def lstsq(m: int = 1000, d: int = 200, seed: int = 1) -> Problem:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, dtype=torch.float64, generator=g) * torch.logspace(-1, 1, d,
                                                                              dtype=torch.float64)
    b = torch.randn(m, dtype=torch.float64, generator=g)
    An, bn = A.numpy(), b.numpy()

    def f(x: Tensor) -> Tensor:
        r = A @ x - b
        return 0.5 * (r @ r)

    def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
        r = An @ x - bn
        return float(0.5 * r @ r), An.T @ r

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return An.T @ (An @ v)

    return Problem("lstsq", f, fg, hessp, np.zeros(d))


def run_scipy(p: Problem, method: str, gtol: float) -> dict:
    opts = {"xtol": 1e-12} if method == "Newton-CG" else {"gtol": gtol}
    res = scipy.optimize.minimize(p.fg, p.x0, jac=True, hessp=p.hessp, method=method,
                                  options={**opts, "maxiter": 200 * len(p.x0)})
    return dict(x=res.x, nit=res.nit, nhev=res.nhev, success=res.success)


def run_torchmin(p: Problem, method: str, gtol: float) -> dict:
    import torchmin  # optional peer: pip install pytorch-minimize

    opts = {"gtol": gtol} if method == "trust-ncg" else {"xtol": 1e-12}
    res = torchmin.minimize(p.f, torch.tensor(p.x0), method=method, options=opts)
    return dict(x=res.x.numpy(), nit=int(res.nit), nhev=int(res.get("nhev", -1)),
                success=bool(res.success))


def run_natgrad(p: Problem, method: str, gtol: float) -> dict:
    res = natgrad.minimize(p.f, torch.tensor(p.x0), method=method, gtol=gtol)
    return dict(x=res.x.numpy(), nit=res.nit, nhev=res.nhev, success=res.success)


def run_natgrad_hessp(p: Problem, method: str, gtol: float) -> dict:
    """natgrad's loop with scipy's numpy ``hessp`` (zero-copy views): isolates the loop."""

    def hvp(x: Tensor, v: Tensor) -> Tensor:
        return torch.from_numpy(p.hessp(x.numpy(), v.numpy()))

    res = natgrad.minimize(p.f, torch.tensor(p.x0), method=method, gtol=gtol, hvp=hvp)
    return dict(x=res.x.numpy(), nit=res.nit, nhev=res.nhev, success=res.success)


RUNNERS = {
    "scipy trust-ncg": lambda p, g: run_scipy(p, "trust-ncg", g),
    "scipy trust-krylov": lambda p, g: run_scipy(p, "trust-krylov", g),
    "scipy Newton-CG": lambda p, g: run_scipy(p, "Newton-CG", g),
    "torchmin trust-ncg": lambda p, g: run_torchmin(p, "trust-ncg", g),
    "torchmin newton-cg": lambda p, g: run_torchmin(p, "newton-cg", g),
    "natgrad trust-ncg": lambda p, g: run_natgrad(p, "trust-ncg", g),
    "natgrad trust-krylov": lambda p, g: run_natgrad(p, "trust-krylov", g),
    "natgrad newton-cg": lambda p, g: run_natgrad(p, "newton-cg", g),
    "natgrad trust-ncg+hessp": lambda p, g: run_natgrad_hessp(p, "trust-ncg", g),
}


def measure(p: Problem, name: str, gtol: float, repeats: int, f_star: float) -> str:
    try:
        out = RUNNERS[name](p, gtol)  # warm-up (and the reported counts)
    except ImportError as e:
        return f"{p.name:>11} {name:<24} skipped: {e}"
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        RUNNERS[name](p, gtol)
        times.append(time.perf_counter() - t)
    f, g = p.fg(out["x"])
    return (f"{p.name:>11} {name:<24} {out['nit']:>6} {out['nhev']:>7} "
            f"{1e3 * statistics.median(times):>10.1f} {np.linalg.norm(g):>10.2e} "
            f"{f - f_star:>10.2e} {'' if out['success'] else 'FAILED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="+",
                    default=["logreg", "rosen100", "rosen10000", "lstsq"])
    ap.add_argument("--methods", nargs="+", default=list(RUNNERS))
    ap.add_argument("--gtol", type=float, default=1e-8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller problems (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy's BLAS too: the same pinning on both sides
    makers = {
        "logreg": lambda: logreg(n=200 if args.quick else 2000, d=10 if args.quick else 50),
        "rosen100": lambda: rosen(100),
        "rosen10000": lambda: rosen(100 if args.quick else 10000),
        "lstsq": lambda: lstsq(m=100 if args.quick else 1000, d=20 if args.quick else 200),
    }
    print(f"torch {torch.__version__}, threads {args.threads}, gtol {args.gtol}, median of "
          f"{args.repeats}")
    print(f"{'problem':>11} {'method':<24} {'nit':>6} {'nhev':>7} {'time ms':>10} "
          f"{'|grad|':>10} {'f - f*':>10}")
    for name in args.problems:
        p = makers[name]()
        tight = natgrad.minimize(p.f, torch.tensor(p.x0), gtol=1e-12)
        f_star = min(float(tight.fun), p.fg(tight.x.numpy())[0])
        for method in args.methods:
            print(measure(p, method, args.gtol, args.repeats, f_star), flush=True)


if __name__ == "__main__":
    main()
