"""Rollout throughput of a full trpo rollout (policy in the loop): gymnasium vs envpool.

Each mode collects rollouts with :func:`trpo.rollout.collect_rollout`, exactly as training
does (numpy actor, the critic and log-probabilities after the loop, observation statistics
updated), on ``--n-envs`` envs of ``--env``, ``--n-steps`` steps per env per rollout, until
``--steps`` env steps are done; env construction, the reset and one warm-up rollout are not
timed. The modes alternate within every round (the order rotates from round to round) in one
process with one pinning for all: ``torch.set_num_threads(--torch-threads)``, numpy's BLAS
limited to one thread (threadpoolctl, when installed), and ``--cpus`` (``os.sched_setaffinity``,
inherited by envpool's threads).

Modes:

* ``gymnasium``: today's path (``SyncVectorEnv``, stepped directly by the collector);
* ``gymnasium-async``: gymnasium ``AsyncVectorEnv`` (one subprocess per env);
* ``envpool``: :class:`trpo.envpool_env.EnvPoolVectorEnv`, one pool, ``--env-threads`` threads;
* ``envpool-async``: two pools stepped in alternation, the policy acting for one half of the
  envs while the other half simulates (``async_envs`` with ``env_backend="envpool"``);
* with ``--sim``, ``sim-<backend>`` rows: the same envs stepped with random actions and
  nothing else, the ceiling of any learner on that backend.

Printed: per mode the median, min and max steps/s over the rounds and the ratio of medians to
``gymnasium``.

Usage (check ``uptime`` first: time nothing while other jobs load the machine)::

    python bench/envpool_throughput.py --env Hopper-v5 --n-envs 8 --steps 100000 --rounds 5 --sim
    python bench/envpool_throughput.py --env CartPole-v1 --steps 2000 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from trpo.envs import make_envs
from trpo.normalize import RunningMeanStd
from trpo.policy import make_actor, make_critic
from trpo.rollout import collect_rollout, env_action_converter, init_rollout_state

MODES = ("gymnasium", "gymnasium-async", "envpool", "envpool-async")


def _make(mode: str, args: argparse.Namespace) -> Any:
    backend = mode.split("-")[0]
    threads = args.env_threads if backend == "envpool" else 0
    return make_envs(
        args.env, args.n_envs, backend=backend, async_=mode.endswith("-async"), num_threads=threads
    )


def rollout_runner(mode: str, args: argparse.Namespace) -> tuple[Callable[[], int], Any]:
    """``(run, envs)``: ``run()`` collects one rollout of the current policy, returns its steps."""
    envs = _make(mode, args)
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    torch.manual_seed(args.seed)
    actor = make_actor(obs_space, act_space, tuple(args.hidden_sizes))
    critic = make_critic(obs_space, tuple(args.hidden_sizes))
    rms = RunningMeanStd(tuple(obs_space.shape)) if args.normalize_obs else None
    state = init_rollout_state(envs, args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def run() -> int:
        r = collect_rollout(
            envs, actor, critic, args.n_steps, state=state, generator=gen, obs_normalizer=rms
        )
        return r.batch_size

    return run, envs


def sim_runner(mode: str, args: argparse.Namespace) -> tuple[Callable[[], int], Any]:
    """``(run, envs)``: ``run()`` steps the envs ``n_steps`` times with random actions."""
    envs = _make(mode.removeprefix("sim-"), args)
    envs.reset(seed=args.seed)
    envs.action_space.seed(args.seed)
    to_env = env_action_converter(envs.single_action_space)
    actions = [to_env(np.asarray(envs.action_space.sample())) for _ in range(args.n_steps)]

    def run() -> int:
        for a in actions:
            envs.step(a)
        return args.n_steps * args.n_envs

    return run, envs


def measure(run: Callable[[], int], steps: int) -> float:
    """Steps per second of ``run()`` repeated until ``steps`` env steps are done."""
    done, t0 = 0, time.perf_counter()
    while done < steps:
        done += run()
    return done / (time.perf_counter() - t0)


def _pin(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    torch.set_num_threads(args.torch_threads)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--n-envs", type=int, default=8)
    p.add_argument("--n-steps", type=int, default=256, help="steps per env per rollout")
    p.add_argument("--steps", type=int, default=100_000, help="env steps timed per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=["gymnasium", "envpool", "envpool-async"]
    )
    p.add_argument("--sim", action="store_true", help="add random-action rows per backend")
    p.add_argument("--env-threads", type=int, default=0, help="envpool threads (0 = its default)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--cpus", default="", help="CPU ids to pin the process to, e.g. 0,1")
    p.add_argument("--hidden-sizes", type=int, nargs="*", default=[64, 64])
    p.add_argument("--normalize-obs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    modes = list(args.modes)
    if args.sim:
        modes += sorted({f"sim-{m.split('-')[0]}" for m in args.modes})
    results: dict[str, list[float]] = {m: [] for m in modes}
    with _pin(args):
        runners = {
            m: (sim_runner if m.startswith("sim-") else rollout_runner)(m, args) for m in modes
        }
        try:
            for run, _ in runners.values():
                run()  # warm-up
            for r in range(args.rounds):
                order = modes[r % len(modes) :] + modes[: r % len(modes)]
                for m in order:
                    results[m].append(measure(runners[m][0], args.steps))
        finally:
            for _, envs in runners.values():
                envs.close()
    print_table(results, args)
    return results


def print_table(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    base = statistics.median(results["gymnasium"]) if results.get("gymnasium") else None
    print(
        f"{args.env}: {args.n_envs} envs × {args.n_steps} steps per rollout, {args.steps} steps "
        f"× {args.rounds} rounds, env threads {args.env_threads or 'default'}, torch threads "
        f"{args.torch_threads}, cpus {args.cpus or 'all'}"
    )
    print(f"{'mode':<18}{'median steps/s':>16}{'min':>10}{'max':>10}{'× gymnasium':>13}")
    for m, xs in results.items():
        med = statistics.median(xs)
        ratio = f"{med / base:13.2f}" if base else f"{'':>13}"
        print(f"{m:<18}{med:16,.0f}{min(xs):10,.0f}{max(xs):10,.0f}{ratio}")


if __name__ == "__main__":
    main()
