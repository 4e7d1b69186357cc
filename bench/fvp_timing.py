"""Time one Fisher-vector product against one gradient for a Gaussian MLP policy.

Compares, for a tanh MLP policy with a state-independent log σ (the TRPO
policy of MuJoCo tasks), the cost of:

* one gradient of a surrogate-like loss ``mean(exp(log π_θ(a|s) − log π_old(a|s)) · A)``
  (the unit);
* ``natgrad.curvature.fisher_operator`` (closed-form ``JᵀF_outJ``, cached
  linearisation): its set-up, and one matvec after set-up, for each
  ``linearization``;
* ``natgrad.curvature.kl_hessian_operator`` (double backprop of the mean KL, the
  seed notes' / SB3's recipe): its set-up (the ``create_graph`` gradient) and one
  matvec.

Usage (HalfCheetah/Walker2d-sized policy, 2 threads)::

    python bench/fvp_timing.py --obs 17 --hidden 64 64 --act 6 --batch 25000 --threads 2

Times are medians over ``--repeats`` runs after warm-up; ratios are per
gradient. Set-up times are per operator construction (once per TRPO update).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call

from natgrad.curvature import LINEARIZATIONS, fisher_operator, kl_hessian_operator
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


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        mean, log_std = dist(p, obs)
        var_ratio = torch.exp(2 * (log_std_old - log_std))
        kl = (
            log_std
            - log_std_old
            + 0.5 * (var_ratio + (mean_old - mean) ** 2 * torch.exp(-2 * log_std))
            - 0.5
        )
        return kl.sum(-1).mean()

    space = ParamSpace(params)
    v = torch.randn(space.numel, dtype=dtype, generator=gen)
    r = args.repeats

    rows: list[tuple[str, float]] = []
    t_grad = timed(lambda: flat_grad(surrogate, params, obs, act, adv), r)
    rows.append(("gradient of surrogate (unit)", t_grad))
    ops = {}
    for lin in LINEARIZATIONS:
        reps = max(3, r // 4) if lin == "linearize" else r
        t_setup = timed(
            lambda lin=lin: fisher_operator(
                dist, params, obs, family="diag_gaussian", linearization=lin
            ),
            reps,
        )
        op = fisher_operator(dist, params, obs, family="diag_gaussian", linearization=lin)
        ops[lin] = op
        rows.append((f"fisher_operator[{lin}] set-up", t_setup))
        rows.append((f"fisher_operator[{lin}] matvec", timed(lambda op=op: op @ v, r)))
    t_kl_setup = timed(lambda: kl_hessian_operator(mean_kl, params, obs), r)
    kl_op = kl_hessian_operator(mean_kl, params, obs)
    rows.append(("kl_hessian_operator set-up", t_kl_setup))
    rows.append(("kl_hessian_operator matvec", timed(lambda: kl_op @ v, r)))

    n_params = space.numel
    print(
        f"policy {'-'.join(map(str, sizes))} (+{args.act} log_std), n = {n_params}, "
        f"B = {args.batch}, {args.dtype}, threads = {torch.get_num_threads()}, "
        f"torch {torch.__version__}, median of {r}"
    )
    print(f"{'measurement':<36} {'ms':>9} {'x gradient':>11}")
    for name, t in rows:
        print(f"{name:<36} {1e3 * t:9.2f} {t / t_grad:11.2f}")
    ref = kl_op @ v
    for lin, op in ops.items():
        diff = ((op @ v - ref).norm() / ref.norm()).item()
        print(f"check: |F v - H_kl v| / |H_kl v| [{lin}] = {diff:.1e}")


if __name__ == "__main__":
    main()
