"""Top Hessian eigenvalue: natgrad.spectral.lanczos vs pyhessian's power iteration.

The model is a 64-128-128-10 tanh MLP on scikit-learn's digits (cross-entropy on
``--batch`` images, float32, trained for a few Adam epochs so that the Hessian is not the
one at initialisation). The reference top eigenvalue comes from natgrad's Lanczos with full
reorthogonalisation run to ``tol = 1e-10`` in float64 on the same data. For each tolerance,
both methods are timed (median of ``--repeats``, set-up included: pyhessian's
``create_graph`` gradient, natgrad's Hessian operator) and their Hessian-vector products
counted; the relative error against the reference is printed, so that speed can be compared
at equal accuracy.

Usage (the measurement: quiet machine)::

    pip install pyhessian scikit-learn
    python bench/spectral_vs_pyhessian.py --threads 2 --repeats 5
    python bench/spectral_vs_pyhessian.py --batch 256 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call

from natgrad import hessian_operator
from natgrad.spectral import lanczos


def setup(batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # pip install scikit-learn

    data = load_digits()
    X = torch.tensor(data.data / 16.0, dtype=torch.float32)[:batch]
    y = torch.tensor(data.target)[:batch]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def natgrad_top(model: nn.Module, X, y, tol: float, dtype=torch.float32) -> tuple[float, int]:
    m = model.to(dtype)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, X, y):
        return nn.functional.cross_entropy(functional_call(m, p, (X,)), y)

    H = hessian_operator(loss, params, X.to(dtype), y)
    res = lanczos(H, k=1, tol=tol, maxiter=200, generator=0)
    return float(res.eigenvalues[0]), res.iterations


def pyhessian_top(model: nn.Module, X, y, tol: float) -> tuple[float, int]:
    # pip install pyhessian; the package's `hessian` class shadows its module of that name.
    ph = importlib.import_module("pyhessian.hessian")

    calls = [0]
    original = ph.hessian_vector_product

    def counted(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        comp = ph.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
        eigs, _ = comp.eigenvalues(maxIter=1000, tol=tol, top_n=1)
    finally:
        ph.hessian_vector_product = original
    return float(eigs[0]), calls[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1797)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, X, y = setup(args.batch)
    ref, _ = natgrad_top(model.double(), X, y, 1e-10, torch.float64)
    model = model.float()
    print(f"reference top eigenvalue (float64 Lanczos, tol 1e-10): {ref:.8g}")
    for fn in (natgrad_top, pyhessian_top):  # warm-up (first-call costs excluded)
        fn(model, X, y, 1e-2)
    print(f"{'method':<22} {'tol':>8} {'HVPs':>6} {'time ms':>9} {'rel. error':>11}")
    for tol in args.tols:
        for name, fn in (("natgrad lanczos", natgrad_top), ("pyhessian power iter", pyhessian_top)):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                value, hvps = fn(model, X, y, tol)
                times.append(time.perf_counter() - t)
            print(f"{name:<22} {tol:>8.0e} {hvps:>6} {1e3 * statistics.median(times):>9.1f} "
                  f"{abs(value - ref) / abs(ref):>11.2e}", flush=True)


if __name__ == "__main__":
    main()
