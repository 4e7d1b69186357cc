"""This project's TRPO against sb3-contrib's TRPO: same env, hyperparameters and seeds, one run.

Each (env, mode, seed) is trained by both sides in fresh subprocesses, alternating which side
goes first from round to round, with the same thread pinning (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS`` and ``torch.set_num_threads``). Printed per env and mode (medians over
rounds and seeds):

* ``steps/s``: environment steps per second of the whole learning loop (from the moment the
  envs exist to the end of the last update; env construction and the final evaluation are not
  timed, on either side);
* ``rollout s``, ``update s`` (``policy s`` + ``critic s``): where that time went. For SB3 the
  update is its ``train()`` (wrapped), split at the first minibatch the critic loop draws from
  the rollout buffer; for ours the ``policy_step`` / ``fit_critic`` timers of ``trpo.train``;
* the ratios SB3 / ours (> 1: ours is faster) and the final returns: the mean of the last 20
  training episodes and of a deterministic evaluation of the final policy (same episodes and
  seeds for both);
* with ``--sim``, a ``sim`` row: the same envs stepped with random actions and nothing else,
  the ceiling of any learner's steps/s.

Modes (hyperparameters in this project's field names; ``sb3_kwargs`` maps them):

* ``identical``: sb3-contrib's TRPO defaults (1 env × 2048 steps, 15 CG iterations, damping 0.1,
  δ = 0.01, 10 critic epochs of minibatch 128, Adam 1e-3, γ = 0.99, λ = 0.95, 64-64 tanh nets,
  no normalisation), our config set to the same; in-process envs on both sides.
* ``preset``: this project's :data:`trpo.presets.PRESETS` entry for the env (rl-zoo's tuned
  values), given to both sides (SB3 gets ``VecNormalize`` when the preset normalises).
* ``best``: ``identical`` with the same samples per update split over 2 envs (2 × 1024): each
  side's best 2-core configuration. MuJoCo envs run in subprocesses (SB3 ``SubprocVecEnv``,
  ours ``async_envs``), cheap classic-control envs in-process (a subprocess costs more than
  their step); ``--vec`` overrides.

Usage (the numbers of docs/benchmarks.md)::

    python bench/compare_sb3.py --envs Hopper-v5 --modes identical best --steps 20480 --rounds 3
    python bench/compare_sb3.py --envs CartPole-v1 Pendulum-v1 --modes preset --steps 100000

Check the machine's load first (``uptime``): time nothing while other jobs run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("sb3", "ours")
MODES = ("identical", "preset", "best")

#: sb3-contrib TRPO's defaults, in this project's config field names.
SB3_DEFAULTS: dict[str, Any] = dict(
    n_envs=1,
    n_steps=2048,
    gamma=0.99,
    gae_lambda=0.95,
    normalize_advantages=True,
    max_kl=0.01,
    cg_iters=15,
    cg_damping=0.1,
    line_search_shrink=0.8,
    line_search_max_tries=10,
    critic_lr=1e-3,
    critic_epochs=10,
    critic_minibatch_size=128,
    hidden_sizes=(64, 64),
    log_std_init=0.0,
    normalize_obs=False,
    normalize_reward=False,
    obs_clip=10.0,
    reward_clip=10.0,
    fvp_fraction=1.0,
)
_MUJOCO_PREFIXES = ("Hopper", "HalfCheetah", "Walker2d", "Ant", "Humanoid", "Swimmer", "Reacher")


def settings_for(env_id: str, mode: str, vec: str = "auto") -> dict[str, Any]:
    """Shared hyperparameters (our field names) plus ``vec`` ('sync' or 'async') for a mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    settings = dict(SB3_DEFAULTS)
    if mode == "preset":
        from trpo.presets import PRESETS

        preset = dict(PRESETS.get(env_id, {}))
        settings.update({k: v for k, v in preset.items() if k in SB3_DEFAULTS})
    elif mode == "best":
        batch = settings["n_envs"] * settings["n_steps"]
        settings.update(n_envs=2, n_steps=batch // 2)
    if vec == "auto":
        vec = "async" if mode == "best" and env_id.startswith(_MUJOCO_PREFIXES) else "sync"
    settings["vec"] = vec
    return settings


def sb3_kwargs(s: dict[str, Any]) -> dict[str, Any]:
    """sb3-contrib ``TRPO(...)`` keyword arguments for shared settings ``s``."""
    if s["fvp_fraction"] != 1.0:
        raise ValueError("fvp_fraction != 1 has no exact SB3 equivalent")
    return dict(
        learning_rate=s["critic_lr"],
        n_steps=s["n_steps"],
        batch_size=s["critic_minibatch_size"],
        gamma=s["gamma"],
        cg_max_steps=s["cg_iters"],
        cg_damping=s["cg_damping"],
        line_search_shrinking_factor=s["line_search_shrink"],
        line_search_max_iter=s["line_search_max_tries"],
        n_critic_updates=s["critic_epochs"],
        gae_lambda=s["gae_lambda"],
        normalize_advantage=s["normalize_advantages"],
        target_kl=s["max_kl"],
        policy_kwargs=dict(
            net_arch=dict(pi=list(s["hidden_sizes"]), vf=list(s["hidden_sizes"])),
            log_std_init=s["log_std_init"],
        ),
    )


# ----------------------------------------------------------------------------- workers
def _evaluate(act, env_id: str, episodes: int, seed: int) -> list[float]:
    """Returns of ``episodes`` deterministic episodes, episode ``i`` reset with ``seed + i``."""
    import gymnasium as gym
    import numpy as np

    env = gym.make(env_id)
    returns = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            done, total = False, 0.0
            while not done:
                a = act(np.asarray(obs))
                if isinstance(env.action_space, gym.spaces.Box):
                    a = np.clip(a, env.action_space.low, env.action_space.high)
                obs, r, te, tr, _ = env.step(a)
                total += float(r)
                done = bool(te or tr)
            returns.append(total)
    finally:
        env.close()
    return returns


def make_sb3_env(env_id: str, s: dict, seed: int, vec_cls=None):
    """SB3's vector env for settings ``s`` (Monitor-wrapped), with ``VecNormalize`` when ours
    normalises; returns ``(env, vecnorm or None)``."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = make_vec_env(env_id, n_envs=s["n_envs"], seed=seed, vec_env_cls=vec_cls)
    vecnorm = None
    if s["normalize_obs"] or s["normalize_reward"]:
        env = vecnorm = VecNormalize(
            env,
            norm_obs=s["normalize_obs"],
            norm_reward=s["normalize_reward"],
            clip_obs=s["obs_clip"],
            clip_reward=s["reward_clip"],
            gamma=s["gamma"],
        )
    return env, vecnorm


def run_sb3(env_id: str, s: dict[str, Any], seed: int, steps: int, eval_episodes: int) -> dict:
    """Train sb3-contrib's TRPO; timings and returns as a dict."""
    import torch
    from sb3_contrib import TRPO
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    vec_cls = SubprocVecEnv if s["vec"] == "async" else DummyVecEnv
    env, vecnorm = make_sb3_env(env_id, s, seed, vec_cls)
    model = TRPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **sb3_kwargs(s))
    timer = {"rollout": 0.0, "policy": 0.0, "critic": 0.0, "critic_start": None}
    collect, train, get = model.collect_rollouts, model.train, model.rollout_buffer.get

    def timed_collect(*a, **k):
        t0 = time.perf_counter()
        out = collect(*a, **k)
        timer["rollout"] += time.perf_counter() - t0
        return out

    def timed_get(batch_size=None):
        # The critic loop is the first caller with a minibatch size.
        if batch_size is not None and timer["critic_start"] is None:
            timer["critic_start"] = time.perf_counter()
        return get(batch_size)

    def timed_train():
        timer["critic_start"] = None
        t0 = time.perf_counter()
        train()
        t1 = time.perf_counter()
        split = timer["critic_start"] or t1
        timer["policy"] += split - t0
        timer["critic"] += t1 - split

    model.collect_rollouts, model.train = timed_collect, timed_train
    model.rollout_buffer.get = timed_get
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t0
    train_returns = [float(ep["r"]) for ep in model.ep_info_buffer][-20:]
    if vecnorm is not None:
        vecnorm.training = False

    def act(obs):
        x = vecnorm.normalize_obs(obs) if vecnorm is not None and s["normalize_obs"] else obs
        return model.predict(x, deterministic=True)[0]

    eval_returns = _evaluate(act, env_id, eval_episodes, 10_000) if eval_episodes else []
    env.close()
    return dict(
        steps=int(model.num_timesteps),
        wall_s=wall,
        rollout_s=timer["rollout"],
        policy_s=timer["policy"],
        critic_s=timer["critic"],
        train_return=_mean(train_returns),
        eval_return=_mean(eval_returns),
        torch_threads=torch.get_num_threads(),
    )


def run_ours(env_id: str, s: dict[str, Any], seed: int, steps: int, eval_episodes: int) -> dict:
    """Train this project's TRPO (``trpo.train.train``); timings and returns as a dict."""
    import importlib

    import torch

    from trpo.config import TRPOConfig
    from trpo.evaluate import evaluate_policy

    # The module, not the `train` function that trpo/__init__ re-exports under that name.
    trpo_train = importlib.import_module("trpo.train")
    fields = {k: v for k, v in s.items() if k != "vec"}
    marks: dict[str, Any] = {"ready": None, "rollout": 0.0, "returns": []}
    make_envs, collect = trpo_train.make_envs, trpo_train.collect_rollout

    def timed_make_envs(*a, **k):
        envs = make_envs(*a, **k)
        marks["ready"] = time.perf_counter()  # the clock starts once the envs exist
        return envs

    def timed_collect(*a, **k):
        t0 = time.perf_counter()
        out = collect(*a, **k)
        marks["rollout"] += time.perf_counter() - t0
        marks["returns"].extend(out.episode_returns.tolist())
        return out

    trpo_train.make_envs, trpo_train.collect_rollout = timed_make_envs, timed_collect
    with tempfile.TemporaryDirectory() as runs_root:
        config = TRPOConfig(
            env_id=env_id,
            total_steps=steps,
            seed=seed,
            async_envs=s["vec"] == "async",
            torch_threads=torch.get_num_threads(),
            eval_episodes=0,
            plot=False,
            tensorboard=False,
            progress=False,
            runs_root=runs_root,
            **fields,
        )
        t0 = time.perf_counter()
        result = trpo_train.train(config)
        t1 = time.perf_counter()
    m = result.metrics
    policy_s = sum(_finite(m.get("time/policy_step_seconds", [])))
    critic_s = sum(_finite(m.get("time/critic_seconds", [])))
    eval_returns = []
    if eval_episodes:
        if result.obs_normalizer is not None:
            result.obs_normalizer.frozen = True
        eval_returns = evaluate_policy(
            result.actor,
            env_id,
            episodes=eval_episodes,
            obs_normalizer=result.obs_normalizer,
            seed=10_000,
        )
    return dict(
        steps=int(result.global_step),
        wall_s=t1 - (marks["ready"] or t0),
        rollout_s=marks["rollout"],
        policy_s=policy_s,
        critic_s=critic_s,
        train_return=_mean(marks["returns"][-20:]),
        eval_return=_mean(eval_returns),
        torch_threads=torch.get_num_threads(),
    )


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if x == x]


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def run_sim(env_id: str, s: dict[str, Any], seed: int, steps: int, eval_episodes: int) -> dict:
    """The simulator alone: the same envs stepped with uniformly random actions (the ceiling
    of any learner's env-steps/s); an episode end resets at once."""
    import gymnasium as gym
    import torch

    envs = [gym.make(env_id) for _ in range(s["n_envs"])]
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
        env.action_space.seed(seed + i)
    t0 = time.perf_counter()
    done_steps = 0
    while done_steps < steps:
        for env in envs:
            _, _, te, tr, _ = env.step(env.action_space.sample())
            if te or tr:
                env.reset()
        done_steps += len(envs)
    wall = time.perf_counter() - t0
    for env in envs:
        env.close()
    nan = float("nan")
    return dict(
        steps=done_steps,
        wall_s=wall,
        rollout_s=wall,
        policy_s=0.0,
        critic_s=0.0,
        train_return=nan,
        eval_return=nan,
        torch_threads=torch.get_num_threads(),
    )


def worker(args: argparse.Namespace) -> None:
    """Run one side once and print its result as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    # The first torch.optim.Adam imports torch._dynamo (seconds): SB3 builds its optimiser
    # before learn() and ours inside train(), so pay that import here for both sides.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    s = json.loads(args.settings)
    s["hidden_sizes"] = tuple(s["hidden_sizes"])
    fn = {"sb3": run_sb3, "ours": run_ours, "sim": run_sim}[args.worker]
    out = fn(args.env, s, args.seed, args.steps, args.eval_episodes)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver
@dataclasses.dataclass
class Trial:
    env: str
    mode: str
    seed: int
    round: int
    side: str
    result: dict


def _run_trial(side: str, env: str, settings: dict, seed: int, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        side,
        "--env",
        env,
        "--seed",
        str(seed),
        "--steps",
        str(args.steps_for(env)),
        "--threads",
        str(args.threads),
        "--eval-episodes",
        str(args.eval_episodes),
        "--settings",
        json.dumps(settings),
    ]
    n = str(args.threads)
    env_vars = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    root = str(Path(__file__).resolve().parents[1])
    env_vars["PYTHONPATH"] = root + os.pathsep + env_vars.get("PYTHONPATH", "")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env_vars, timeout=args.timeout, cwd=root
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{side} on {env} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
        f"{proc.stderr[-4000:]}"
    )


def _med(trials: list[Trial], side: str, key: str) -> float:
    xs = [t.result[key] for t in trials if t.side == side and t.result[key] == t.result[key]]
    return statistics.median(xs) if xs else float("nan")


def summarize(trials: list[Trial]) -> str:
    """The comparison table (medians over rounds and seeds) as text."""
    lines = []
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.env, t.mode), []).append(t)
    head = (
        f"{'env':<13} {'mode':<9} {'side':<5} {'steps':>7} {'steps/s':>8} {'wall s':>7} "
        f"{'rollout s':>9} {'update s':>8} {'policy s':>8} {'critic s':>8} "
        f"{'train ret':>9} {'eval ret':>9}"
    )
    lines.append(head)
    lines.append("-" * len(head))
    for (env, mode), ts in groups.items():
        med: dict[str, dict[str, float]] = {}
        sides = [*SIDES, "sim"] if any(t.side == "sim" for t in ts) else list(SIDES)
        for side in sides:
            r = {
                k: _med(ts, side, k)
                for k in (
                    "steps",
                    "wall_s",
                    "rollout_s",
                    "policy_s",
                    "critic_s",
                    "train_return",
                    "eval_return",
                )
            }
            r["update_s"] = r["policy_s"] + r["critic_s"]
            r["sps"] = r["steps"] / r["wall_s"] if r["wall_s"] > 0 else float("nan")
            med[side] = r
            lines.append(
                f"{env:<13} {mode:<9} {side:<5} {r['steps']:7.0f} {r['sps']:8.0f} "
                f"{r['wall_s']:7.2f} {r['rollout_s']:9.2f} {r['update_s']:8.2f} "
                f"{r['policy_s']:8.2f} {r['critic_s']:8.2f} {r['train_return']:9.1f} "
                f"{r['eval_return']:9.1f}"
            )
        a, b = med["sb3"], med["ours"]

        def ratio(key: str, a: dict = a, b: dict = b) -> float:
            return a[key] / b[key] if b[key] > 0 else float("nan")

        lines.append(
            f"{env:<13} {mode:<9} {'x':<5} {'':>7} {b['sps'] / a['sps']:8.2f} "
            f"{ratio('wall_s'):7.2f} {ratio('rollout_s'):9.2f} {ratio('update_s'):8.2f} "
            f"{ratio('policy_s'):8.2f} {ratio('critic_s'):8.2f}   (speed-up of ours: SB3 / ours)"
        )
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1", "Hopper-v5"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=["identical"])
    p.add_argument(
        "--steps", type=int, default=None, help="env steps per run (default: per-env budget)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=1, help="alternations per (env, mode, seed)")
    p.add_argument("--threads", type=int, default=1, help="torch / OMP / MKL threads, both sides")
    p.add_argument("--vec", choices=("auto", "sync", "async"), default="auto")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per training run")
    p.add_argument("--json", type=str, default=None, help="also write every trial here")
    p.add_argument("--worker", choices=(*SIDES, "sim"), default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--sim",
        action="store_true",
        help="also time the simulator alone (random actions, same envs and steps)",
    )
    p.add_argument("--env", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args)
        return 0

    budget = {"CartPole-v1": 100_000, "Pendulum-v1": 100_000}
    args.steps_for = lambda env: args.steps or budget.get(env, 20_480)
    import torch

    print(
        f"compare_sb3: torch {torch.__version__}, threads {args.threads}, cpus "
        f"{os.cpu_count()}, load {_load()}",
        flush=True,
    )
    trials: list[Trial] = []
    for env in args.envs:
        for mode in args.modes:
            settings = settings_for(env, mode, args.vec)
            print(f"{env} {mode}: {json.dumps(settings)}", flush=True)
            for seed in args.seeds:
                for r in range(args.rounds):
                    order = SIDES if r % 2 == 0 else SIDES[::-1]
                    if args.sim and r == 0:
                        order = (*order, "sim")
                    for side in order:
                        res = _run_trial(side, env, settings, seed, args)
                        trials.append(Trial(env, mode, seed, r, side, res))
                        print(
                            f"  seed {seed} round {r} {side:<4}: {res['steps']} steps in "
                            f"{res['wall_s']:.2f} s (rollout {res['rollout_s']:.2f}, policy "
                            f"{res['policy_s']:.2f}, critic {res['critic_s']:.2f}), return "
                            f"{res['train_return']:.1f} / eval {res['eval_return']:.1f}, load "
                            f"{_load()}",
                            flush=True,
                        )
    print()
    print(summarize(trials))
    print(f"load average at the end: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(t) for t in trials], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
