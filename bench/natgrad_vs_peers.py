"""natgrad beside scipy, torchmin (pytorch-minimize) and curvlinops, in one side-by-side table.

Problems from ``curvature_problems`` (logistic regression N×50 with column scales 1e-2…1e2,
λ = 1e-3, and a 64-32-32-10 tanh MLP under cross-entropy; float64, 1 torch thread):

1. **HVP cost** (median ms per product): natgrad's ``hessian_operator`` (``auto`` and
   ``forward_over_reverse``), a hand-written torch double-backprop HVP, curvlinops'
   ``HessianLinearOperator`` (plus ``λI`` for the logistic L2 term, which curvlinops' loss
   does not include) and, for the logistic problem, scipy's closed-form numpy ``hessp``
   ``Xᵀ(s(1 − s) ⊙ Xv)/N + λv``.
2. **Newton-CG on the logistic problem** (wall ms to ``‖∇L‖ ≤ 1e-8``, final loss, iterations):
   scipy ``minimize(method="Newton-CG" | "trust-ncg")`` with numpy ``jac``/``hessp``, torchmin
   ``minimize(method="newton-cg" | "trust-ncg")``, and natgrad: ``natgrad.minimize`` when the
   package has it, and a plain Newton-CG loop on ``value_grad_hessian`` + ``cg_solve``
   (inexact Newton, forcing term ``min(0.5, √‖g‖)``, Armijo backtracking).
3. **Start-up** (s, fresh interpreter): ``import natgrad``, and the first operator build +
   product in a process (beyond the import).

Run (small sizes for a check, the default N = 2,000 for the measurement)::

    BENCH_CURV_N=200 python bench/natgrad_vs_peers.py --repeats 3
    python bench/natgrad_vs_peers.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from curvature_problems import PROBLEMS, CurvatureProblem, hand_hvp, make_problem

import natgrad

LAM = 1e-3  # the logistic problem's L2 weight (curvature_problems._logistic)
GTOL = 1e-8


def median_ms(fn: Callable[[], object], repeats: int, inner: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------- HVP cost
def curvlinops_hvp(p: CurvatureProblem) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import curvlinops  # noqa: PLC0415 - optional peer
    except ImportError:
        return None
    if p.name == "logistic":
        model = torch.nn.Linear(p.x.shape[1], 1, bias=False).to(torch.float64)
        model.weight.data.copy_(p.params["w"].reshape(1, -1))
        data = [(p.x, p.y.reshape(-1, 1))]
        loss, extra = torch.nn.BCEWithLogitsLoss(), LAM
    else:
        model = _module_of(p)
        data, loss, extra = [(p.x, p.y)], torch.nn.CrossEntropyLoss(), 0.0
    op = curvlinops.HessianLinearOperator(
        model, loss, list(model.parameters()), data, check_deterministic=False
    )
    return lambda v: op @ v + extra * v


def _module_of(p: CurvatureProblem) -> torch.nn.Module:
    """The nn.Module behind the mlp problem's logits (its parameters at ``p.params``)."""
    for cell in p.model.__closure__ or ():
        if isinstance(cell.cell_contents, torch.nn.Module):
            net = cell.cell_contents
            for name, t in net.named_parameters():
                t.data.copy_(p.params[name])
            return net
    raise RuntimeError("mlp problem without a module")


def scipy_hessp(p: CurvatureProblem) -> Callable[[np.ndarray], np.ndarray]:
    X = p.x.numpy()
    s = 1 / (1 + np.exp(-X @ p.params["w"].numpy()))
    d = s * (1 - s) / X.shape[0]
    return lambda v: X.T @ (d * (X @ v)) + LAM * v


def hvp_rows(p: CurvatureProblem, repeats: int) -> list[tuple[str, float]]:
    v = torch.randn(p.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = hand_hvp(p)(v)
    rows = [("torch hand-written double backprop", hand_hvp(p))]
    for method in ("auto", "forward_over_reverse"):
        op = natgrad.hessian_operator(p.loss, p.params, p.x, p.y, method=method)
        rows.append((f"natgrad hessian_operator[{method}]", op.matvec))
    theirs = curvlinops_hvp(p)
    if theirs is not None:
        rows.append(("curvlinops HessianLinearOperator", theirs))
    out = []
    for name, mv in rows:
        assert torch.allclose(mv(v), ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max())), name
        out.append((name, median_ms(lambda mv=mv: mv(v), repeats)))
    if p.name == "logistic":
        hp, vn = scipy_hessp(p), v.numpy()
        assert np.allclose(hp(vn), ref.numpy(), rtol=1e-8, atol=1e-12)
        out.append(("scipy numpy hessp (closed form)", median_ms(lambda: hp(vn), repeats)))
    return out


# -------------------------------------------------------------------------- Newton-CG
def natgrad_newton_cg(p: CurvatureProblem) -> tuple[torch.Tensor, int]:
    """Inexact Newton: (H) s = −g by CG to rtol min(0.5, √‖g‖), Armijo backtracking."""
    w = p.params["w"].clone()

    def f(w):
        return p.loss({"w": w}, p.x, p.y)

    for it in range(1, 101):
        value, g, H = natgrad.value_grad_hessian(f, w)
        gnorm = float(g.norm())
        if gnorm <= GTOL:
            return w, it - 1
        sol = natgrad.cg_solve(H, -g, rtol=min(0.5, gnorm**0.5), maxiter=200)
        step, t = sol.x, 1.0
        slope = float(g @ step)
        while t > 1e-10 and float(f(w + t * step)) > float(value) + 1e-4 * t * slope:
            t *= 0.5
        w = w + t * step
    return w, 100


def newton_rows(p: CurvatureProblem, repeats: int) -> list[tuple[str, float, float, int]]:
    X, y = p.x.numpy(), p.y.numpy()
    w0 = p.params["w"].numpy()

    def fun(w):
        z = X @ w
        return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * LAM * w @ w)

    def jac(w):
        return X.T @ (1 / (1 + np.exp(-X @ w)) - y) / len(y) + LAM * w

    def hessp(w, v):
        s = 1 / (1 + np.exp(-X @ w))
        return X.T @ (s * (1 - s) / len(y) * (X @ v)) + LAM * v

    runs: dict[str, Callable[[], tuple[float, int]]] = {}
    for method in ("Newton-CG", "trust-ncg"):
        opts = {"xtol": 1e-12} if method == "Newton-CG" else {"gtol": GTOL}

        def run(method=method, opts=opts):
            r = scipy.optimize.minimize(fun, w0, jac=jac, hessp=hessp, method=method, options=opts)
            return r.fun, r.nit

        runs[f"scipy {method} (numpy hessp)"] = run
    try:
        import torchmin  # noqa: PLC0415 - optional peer

        def tm(method):
            def run():
                r = torchmin.minimize(
                    lambda w: p.loss({"w": w}, p.x, p.y),
                    p.params["w"].clone(),
                    method=method,
                    tol=GTOL,
                )
                return float(r.fun), int(r.nit)

            return run

        runs["torchmin newton-cg"] = tm("newton-cg")
        runs["torchmin trust-ncg"] = tm("trust-ncg")
    except ImportError:
        pass
    minimize = getattr(natgrad, "minimize", None)
    if minimize is not None:

        def run_minimize():
            r = minimize(
                lambda w: p.loss({"w": w}, p.x, p.y), p.params["w"].clone(), method="newton-cg"
            )
            return float(r.fun), int(r.nit)

        runs["natgrad.minimize newton-cg"] = run_minimize

    def run_loop():
        w, nit = natgrad_newton_cg(p)
        return float(p.loss({"w": w}, p.x, p.y)), nit

    runs["natgrad value_grad_hessian + cg_solve"] = run_loop
    rows = []
    for name, run in runs.items():
        value, nit = run()
        rows.append((name, median_ms(run, repeats, inner=1), value, nit))
    return rows


# ---------------------------------------------------------------------------- start-up
STARTUP = """
import time, torch
t0 = time.perf_counter(); import natgrad; t1 = time.perf_counter()
x = torch.randn(256, 10, dtype=torch.float64); y = (torch.rand(256) < 0.5).double()
def loss(p, x, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ p['w'], y)
op = natgrad.hessian_operator(loss, {'w': torch.zeros(10, dtype=torch.float64)}, x, y)
op @ torch.ones(10, dtype=torch.float64); t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def startup_rows(repeats: int) -> list[tuple[str, float]]:
    root = Path(__file__).resolve().parents[1]
    samples = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", STARTUP], capture_output=True, text=True, cwd=root, check=True
        )
        samples.append([float(t) for t in out.stdout.split()])
    imp, first = zip(*samples)
    return [
        ("import natgrad (s)", statistics.median(imp)),
        ("first hessian_operator build + product (s)", statistics.median(first)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float64")
    for name in PROBLEMS:
        p = make_problem(name)
        print(f"\n## HVP cost, {name} (N = {p.x.shape[0]}, n = {p.n})")
        rows = hvp_rows(p, args.repeats)
        hand = rows[0][1]
        print(f"{'method':<46} {'ms/product':>11} {'x hand':>7}")
        for label, ms in rows:
            print(f"{label:<46} {ms:11.4f} {ms / hand:7.2f}")
    p = make_problem("logistic")
    print(f"\n## Newton-CG, logistic (N = {p.x.shape[0]}, D = {p.n}), to ‖∇L‖ ≤ {GTOL:g}")
    print(f"{'solver':<46} {'ms':>10} {'final loss':>20} {'iters':>6}")
    for label, ms, value, nit in newton_rows(p, max(3, args.repeats // 4)):
        print(f"{label:<46} {ms:10.2f} {value:20.14f} {nit:6d}")
    print("\n## Start-up (fresh interpreter, median)")
    for label, s in startup_rows(max(3, args.repeats // 4)):
        print(f"{label:<46} {s:10.3f}")


if __name__ == "__main__":
    main()
