"""Time one Fisher-vector product against one gradient for a Gaussian MLP policy.

Compares, for a tanh MLP policy with a state-independent log σ (the TRPO
policy of MuJoCo tasks), the cost of:

* one gradient of a surrogate-like loss ``mean(exp(log π_θ(a|s) − log π_old(a|s)) · A)``
  (the unit);
* ``natgrad.curvature.fisher_operator`` (closed-form ``JᵀF_outJ``, cached
  linearisation): its set-up, and one matvec after set-up, for each
  ``linearization``, and for ``"custom"``: the written-out tanh-MLP products of
  ``natgrad.mlp.mlp_dist_fn`` (what the TRPO actor uses);
* ``natgrad.curvature.kl_hessian_operator`` (double backprop of the mean KL, the
  seed notes' / SB3's recipe): its set-up (the ``create_graph`` gradient) and one
  matvec.

Usage (HalfCheetah/Walker2d-sized policy, 2 threads)::

    python bench/fvp_timing.py --obs 17 --hidden 64 64 --act 6 --batch 25000 --threads 2

Times are medians (and minima) over ``--repeats`` interleaved rounds after
warm-up; ratios are per gradient. Set-up times are per operator construction (once per TRPO update).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call

from natgrad.curvature import LINEARIZATIONS, fisher_operator, kl_hessian_operator
from natgrad.families import kl_divergence
from natgrad.mlp import mlp_dist_fn
from natgrad.params import ParamSpace, flat_grad


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--obs", type=int, default=17, help="observation size")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden layer sizes")
    p.add_argument("--act", type=int, default=6, help="action size")
    p.add_argument("--batch", type=int, default=25_000, help="number of states B")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def timed_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each ``fn()``, interleaved: every round times every function once.

    Interleaving makes the ratios robust to load that changes over time (the
    machine may be shared); each function is warmed up twice first.
    """
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    sizes = [args.obs, *args.hidden, args.act]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    net = torch.nn.Sequential(*layers).to(dtype)
    params = {k: v.detach() for k, v in net.named_parameters()}
    params["log_std"] = torch.full((args.act,), -0.5, dtype=dtype)

    obs = torch.randn(args.batch, args.obs, dtype=dtype, generator=gen)

    def dist(p: dict[str, torch.Tensor], obs: torch.Tensor):
        mean = functional_call(net, {k: v for k, v in p.items() if k != "log_std"}, (obs,))
        return mean, p["log_std"]

    def log_prob(p, obs, act):
        mean, log_std = dist(p, obs)
        return (-0.5 * ((act - mean) * torch.exp(-log_std)) ** 2 - log_std).sum(-1)

    with torch.no_grad():
        mean_old, log_std_old = dist(params, obs)
        act = mean_old + torch.exp(log_std_old) * torch.randn(
            mean_old.shape, generator=gen, dtype=dtype
        )
        logp_old = log_prob(params, obs, act)
    adv = torch.randn(args.batch, dtype=dtype, generator=gen)

    def surrogate(p, obs, act, adv):
        return (torch.exp(log_prob(p, obs, act) - logp_old) * adv).mean()

    def mean_kl(p, obs):
        return kl_divergence("diag_gaussian", (mean_old, log_std_old), dist(p, obs)).mean()

    space = ParamSpace(params)
    v = torch.randn(space.numel, dtype=dtype, generator=gen)

    # The same policy through natgrad.mlp: hand-written J, Jᵀ ("custom" linearisation).
    written_out = mlp_dist_fn(net, family="diag_gaussian", log_std="log_std")
    dist_fns = {lin: dist for lin in LINEARIZATIONS} | {"custom": written_out}
    ops = {
        lin: fisher_operator(fn, params, obs, family="diag_gaussian", linearization=lin)
        for lin, fn in dist_fns.items()
    }
    kl_op = kl_hessian_operator(mean_kl, params, obs)
    fns: dict[str, Callable[[], object]] = {
        "gradient of surrogate (unit)": lambda: flat_grad(surrogate, params, obs, act, adv)
    }
    for lin, op in ops.items():
        fns[f"fisher_operator[{lin}] set-up"] = lambda lin=lin: fisher_operator(
            dist_fns[lin], params, obs, family="diag_gaussian", linearization=lin
        )
        fns[f"fisher_operator[{lin}] matvec"] = lambda op=op: op @ v
    fns["kl_hessian_operator set-up"] = lambda: kl_hessian_operator(mean_kl, params, obs)
    fns["kl_hessian_operator matvec"] = lambda: kl_op @ v
    times = timed_rounds(fns, args.repeats)

    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    unit = "gradient of surrogate (unit)"
    print(
        f"policy {'-'.join(map(str, sizes))} (+{args.act} log_std), n = {space.numel}, "
        f"B = {args.batch}, {args.dtype}, threads = {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.repeats} interleaved rounds"
    )
    print(f"{'measurement':<36} {'median ms':>10} {'x grad':>7} {'min ms':>8} {'x grad':>7}")
    for name in fns:
        print(
            f"{name:<36} {1e3 * med[name]:10.2f} {med[name] / med[unit]:7.2f} "
            f"{1e3 * best[name]:8.2f} {best[name] / best[unit]:7.2f}"
        )
    ref = kl_op @ v
    for lin, op in ops.items():
        diff = ((op @ v - ref).norm() / ref.norm()).item()
        print(f"check: |F v - H_kl v| / |H_kl v| [{lin}] = {diff:.1e}")


if __name__ == "__main__":
    main()
