"""Correctness checks of the GPU paths, and the short table that ends ``bench/gpu_check.sh``.

``python bench/gpu_checks.py --json OUT.json`` runs each check on CUDA and records PASS/FAIL:

* fixed-iteration CG, the natural step, the batched line search, the whole
  ``policy_step_tensors`` and the critic's fused epochs run under
  ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises);
* the policy step on CUDA equals the CPU step (float64);
* the CUDA-graph policy step and critic fit equal the eager ones over several updates;
* the fused Adam kernel is available on CUDA (else the critic graph falls back to eager);
* ``trpo.train`` runs two updates of CartPole on CUDA (all the update options on);
* ``natgrad.minimize`` (both methods), the three ``natgrad.optim`` optimizers and
  ``natgrad.spectral.lanczos`` give on CUDA what they give on the CPU (float64).

``python bench/gpu_checks.py --summary CHECKS.json BENCH.json ...`` prints the short table of
the checks and of the benchmark JSONs written by pytest-benchmark (``--benchmark-json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# After the path set-up above (run as a script from anywhere): hence E402.
from bench_problems import make_policy_problem, make_trpo_problem  # noqa: E402

from natgrad.cg import CG, cg_solve  # noqa: E402
from natgrad.curvature import fisher_operator  # noqa: E402
from natgrad.distributed import LOCAL  # noqa: E402
from natgrad.minimize import minimize  # noqa: E402
from natgrad.mlp import FlatMLP, fused_adam_available  # noqa: E402
from natgrad.optim import HessianFree, NaturalGradient, TrustRegionNewton  # noqa: E402
from natgrad.params import ParamSpace, flat_grad  # noqa: E402
from natgrad.spectral import lanczos  # noqa: E402
from natgrad.trust_region import line_search, natural_step  # noqa: E402
from trpo.critic import CriticSettings, _epochs, _FusedTrainer, fit_critic  # noqa: E402
from trpo.presets import config_for  # noqa: E402
from trpo.train import train  # noqa: E402
from trpo.update import PolicyBatch, PolicyStepSettings, policy_step, policy_step_tensors  # noqa: E402

STEP = PolicyStepSettings(max_kl=0.01, cg_iters=15, cg_damping=0.1)

CHECKS: list[tuple[str, Callable[[], str]]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        CHECKS.append((name, fn))
        return fn

    return register


class _NoSync:
    """``torch.cuda.set_sync_debug_mode("error")`` for the duration of a block."""

    def __enter__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")


def _problem(case: str = "cheetah@25k"):
    return make_policy_problem(case, "cuda")


@check("cg_solve fixed 10 iterations: no host sync")
def _cg_no_sync() -> str:
    p = _problem()
    op = fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian")
    _, g = flat_grad(p.surrogate, p.params)
    with _NoSync():
        res = cg_solve(op, g, damping=0.1, rtol=0.0, atol=0.0, maxiter=10, check_finite=False)
    rel = float((op.damped(0.1) @ res.x - g).norm() / g.norm())
    assert rel < 0.5, f"relative residual {rel:.2e}"
    return f"relative residual after 10 iterations {rel:.2e}"


@check("fisher set-up + natural_step + batched line_search: no host sync")
def _step_no_sync() -> str:
    p = _problem()
    space = ParamSpace(p.params)
    theta = space.ravel(p.params)
    _, g = flat_grad(p.surrogate, p.params)
    with _NoSync():
        op = fisher_operator(p.dist, p.params, p.obs, family="diag_gaussian")
        solver = CG(rtol=0.0, maxiter=15, check_finite=False)
        st = natural_step(g, op, 0.01, damping=0.1, solver=solver)
        vf = torch.func.vmap(lambda th: p.surrogate(space.unravel(th)))
        vc = torch.func.vmap(lambda th: p.mean_kl(space.unravel(th), p.obs))
        res = line_search(
            vf,
            vc,
            theta,
            st.step,
            delta=0.01,
            expected_improvement=st.expected_improvement,
            batched=True,
        )
    return f"accepted={bool(res.accepted)} tries={int(res.tries)} kl={float(res.constraint):.2e}"


@check("policy_step_tensors and critic fused epochs: no host sync")
def _policy_no_sync() -> str:
    out = []
    for case in ("hopper@2k", "cheetah@25k"):
        p = make_trpo_problem(case, "cuda")
        trainer = _FusedTrainer(FlatMLP(list(p.critic.parameters()), p.optimizer), LOCAL)
        n = p.batch.obs.shape[0]
        perms = torch.stack([torch.randperm(n) for _ in range(2)]).cuda()
        sizes = [len(s) for s in torch.tensor_split(torch.arange(n), -(-n // 128))]
        # A first step checks the written-out actor forward once (a host read), as the
        # eager warm-up before a CUDA-graph recording does.
        policy_step_tensors(p.actor, p.batch, STEP)
        with _NoSync(), torch.no_grad():
            res = policy_step_tensors(p.actor, p.batch, STEP)
            _epochs(trainer, p.batch.obs, p.returns, perms, sizes, [float(s) for s in sizes])
        out.append(f"{case}: accepted={bool(res.stats[0])}")
    return ", ".join(out)


@check("policy_step on CUDA equals CPU (float64)")
def _cuda_equals_cpu() -> str:
    p = make_trpo_problem("hopper@2k", "cpu")
    actor_cpu = copy.deepcopy(p.actor).double()
    actor_gpu = copy.deepcopy(p.actor).double().cuda()
    batch = type(p.batch)(*(t.double() for t in (p.batch.obs, p.batch.actions, p.batch.advantages)))
    gpu_batch = type(batch)(*(t.cuda() for t in (batch.obs, batch.actions, batch.advantages)))
    a = policy_step(actor_cpu, batch, STEP)
    b = policy_step(actor_gpu, gpu_batch, STEP)
    err = max(
        float((x - y.cpu()).abs().max())
        for x, y in zip(actor_cpu.parameters(), actor_gpu.parameters())
    )
    assert a.applied == b.applied and a.line_search_tries == b.line_search_tries, (a, b)
    assert err < 1e-9, f"max |θ_cpu − θ_gpu| = {err:.2e}"
    return f"max |θ_cpu − θ_gpu| = {err:.1e}, kl {a.kl:.3e} vs {b.kl:.3e}"


@check("CUDA-graph policy step equals the eager step (3 updates)")
def _graphed_policy() -> str:
    p = make_trpo_problem("cheetah@25k", "cuda")
    ref = copy.deepcopy(p.actor)
    graphed = dataclasses.replace(STEP, cuda_graph=True)
    err = 0.0
    for k in range(3):
        gen = torch.Generator(device="cuda").manual_seed(k)
        batch = PolicyBatch(
            obs=torch.randn(p.batch.obs.shape, generator=gen, device="cuda"),
            actions=p.batch.actions,
            advantages=torch.randn(p.batch.advantages.shape, generator=gen, device="cuda"),
        )
        a = policy_step(p.actor, batch, graphed)
        b = policy_step(ref, batch, STEP)
        assert a.applied == b.applied, (a, b)
        err = max(
            err,
            max(float((x - y).abs().max()) for x, y in zip(p.actor.parameters(), ref.parameters())),
        )
    assert err < 1e-4, f"max |θ_graph − θ_eager| = {err:.2e}"
    return f"max |θ_graph − θ_eager| = {err:.1e}"


@check("CUDA-graph critic fit equals the eager fit (3 updates)")
def _graphed_critic() -> str:
    p = make_trpo_problem("hopper@2k", "cuda")
    critic, ref = p.critic, copy.deepcopy(p.critic)
    opt = p.optimizer
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    err = 0.0
    for k in range(3):
        settings = CriticSettings(epochs=10, minibatch_size=128)
        graphed = dataclasses.replace(settings, cuda_graph=True)
        gens = [torch.Generator().manual_seed(k) for _ in range(2)]
        a = fit_critic(critic, opt, p.batch.obs, p.returns, graphed, generator=gens[0])
        b = fit_critic(ref, ref_opt, p.batch.obs, p.returns, settings, generator=gens[1])
        err = max(
            err,
            max(float((x - y).abs().max()) for x, y in zip(critic.parameters(), ref.parameters())),
        )
        assert abs(a.value_loss - b.value_loss) <= 1e-4 * abs(b.value_loss), (a, b)
    assert err < 1e-4, f"max |φ_graph − φ_eager| = {err:.2e}"
    return f"max |φ_graph − φ_eager| = {err:.1e}"


@check("fused Adam kernel on CUDA")
def _fused() -> str:
    assert fused_adam_available(torch.device("cuda"), torch.float32)
    return "torch._fused_adam_ usable"


@check("trpo.train: 2 CartPole updates on CUDA")
def _train_cuda() -> str:
    with tempfile.TemporaryDirectory() as runs:
        config = config_for(
            "CartPole-v1",
            device="cuda",
            total_steps=2048,
            eval_episodes=0,
            plot=False,
            tensorboard=False,
            progress=False,
            runs_root=runs,
        )
        t0 = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - t0
    return f"{result.global_step} steps in {wall:.1f} s"


def optim_results(device: str) -> dict[str, torch.Tensor]:
    """What ``natgrad.minimize``, the optimizers and ``lanczos`` return on ``device`` (float64,
    same seeds): the values the CUDA check compares with the CPU's."""
    out: dict[str, torch.Tensor] = {}

    def rosen(x: torch.Tensor) -> torch.Tensor:
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    x0 = torch.linspace(-1.0, 1.0, 100, dtype=torch.float64, device=device)
    for method in ("trust-ncg", "newton-cg"):
        res = minimize(rosen, x0, method=method, gtol=1e-9).raise_if_failed()
        out[f"minimize {method}"] = res.x
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 5, generator=g, dtype=torch.float64).to(device)
    y = (X @ torch.randn(5, 3, generator=g, dtype=torch.float64).to(device)).argmax(1)
    for name in ("HessianFree", "NaturalGradient", "TrustRegionNewton"):
        out[name] = _three_steps(name, X, y, device)
    A = torch.randn(60, 60, generator=g, dtype=torch.float64)
    out["lanczos"] = lanczos((A + A.T).to(device), k=3, tol=1e-10).eigenvalues
    return out


def _three_steps(name: str, X: torch.Tensor, y: torch.Tensor, device: str) -> torch.Tensor:
    """The flat parameters of a 5-16-3 tanh classifier after 3 steps of optimizer ``name``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double().to(device)
    params = model.parameters()
    if name == "HessianFree":
        opt = HessianFree(params, model, damping=1.0)
    elif name == "NaturalGradient":
        opt = NaturalGradient(params, model, family="categorical", max_kl=0.01)
    else:
        opt = TrustRegionNewton(params, model, radius=0.5)
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(X), y), X[:64])
    return torch.cat([q.detach().flatten() for q in model.parameters()])


@check("natgrad.minimize, natgrad.optim and lanczos on CUDA equal the CPU (float64)")
def _optim_cuda() -> str:
    cpu, gpu = optim_results("cpu"), optim_results("cuda")
    errs = {k: float((cpu[k] - gpu[k].cpu()).abs().max()) for k in cpu}
    bad = {k: e for k, e in errs.items() if not e < 1e-6}
    assert not bad, f"max |cpu − cuda| too large: {bad}"
    return ", ".join(f"{k} {e:.0e}" for k, e in errs.items())


def run_checks(path: Path | None) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    rows = []
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001 - report every failure, run every check
            detail, ok = f"{type(e).__name__}: {e}", False
            traceback.print_exc()
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
        rows.append(dict(check=name, ok=ok, detail=detail, seconds=time.perf_counter() - t0))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        if path is not None:  # after every check: a time limit keeps what was done
            path.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


# ----------------------------------------------------------------------------- summary
def summary(checks: Path | None, benches: list[Path]) -> None:
    print("=" * 78)
    print("GPU check summary")
    if checks is not None and checks.exists():
        for r in json.loads(checks.read_text()):
            print(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['check']}")
    else:
        print("  (no check results)")
    times: dict[tuple[str, str, str], float] = {}
    machine = ""
    for path in benches:
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        machine = machine or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
        for b in data.get("benchmarks", []):
            params, extra = b.get("params") or {}, b.get("extra_info") or {}
            op = extra.get("op")
            if op and "case" in params and "device" in params:
                key = (params["case"], params["device"])
                times[(*key, op)] = b["stats"]["median"]
                for k, v in extra.items():
                    if k.endswith("_s") and isinstance(v, (int, float)):
                        times[(*key, k[:-2])] = v
    if not times:
        print("  (no benchmark results)")
        return
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "?"
    threads = os.environ.get("BENCH_THREADS", "1")
    print(f"  medians; cuda = {gpu}; cpu = {machine}, {threads} torch thread(s)")
    head = (
        f"  {'case':<12} {'dev':<4} {'grad ms':>8} {'fvp/g':>6} {'2bp/g':>6} {'step ms':>8} "
        f"{'graph ms':>8} {'graph/g':>7} {'upd ms':>8} {'sb3 ms':>8} {'sb3/ours':>8}"
    )
    print(head)
    cases = sorted({(c, d) for c, d, _ in times})
    for case, dev in cases:

        def t(op: str, case: str = case, dev: str = dev) -> float | None:
            return times.get((case, dev, op))

        g = t("grad")

        def ratio(x: float | None, y: float | None) -> str:
            return f"{x / y:.2f}" if x and y else "-"

        def ms(x: float | None) -> str:
            return f"{1e3 * x:.1f}" if x else "-"

        ours = t("update_graphed") or t("update")
        print(
            f"  {case:<12} {dev:<4} {ms(g):>8} {ratio(t('fvp_fisher'), g):>6} "
            f"{ratio(t('fvp_kl_2bp'), g):>6} {ms(t('policy_step')):>8} "
            f"{ms(t('policy_step_graphed')):>8} {ratio(t('policy_step_graphed'), g):>7} "
            f"{ms(ours):>8} {ms(t('sb3_train')):>8} {ratio(t('sb3_train'), ours):>8}"
        )
    print(
        "  fvp/g, 2bp/g: one Fisher / double-backprop product per gradient; graph: the policy\n"
        "  step as a CUDA graph; upd: policy step + critic fit (graphed on cuda); sb3/ours:\n"
        "  SB3-contrib's train() over ours on the same batch and settings"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="write the check results here")
    p.add_argument("--summary", type=Path, nargs="+", default=None, help="CHECKS.json BENCH.json…")
    args = p.parse_args(argv)
    if args.summary:
        summary(args.summary[0], args.summary[1:])
        return 0
    return run_checks(args.json)


if __name__ == "__main__":
    sys.exit(main())
