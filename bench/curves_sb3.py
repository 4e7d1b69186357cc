"""Learning curves of this project's TRPO and sb3-contrib's TRPO on the same axes.

For each env and seed, both sides train for the same number of env steps with the env's
preset (:data:`trpo.presets.PRESETS`, mapped to SB3 by ``bench/compare_sb3.py``'s
``settings_for(env, "preset")`` / ``sb3_kwargs``; SB3 gets ``VecNormalize`` when the preset
normalises), one torch thread, one run at a time, each in its own subprocess:

* ours: ``python -m trpo.run ... --run-name ours_ENV_S``; curve from ``metrics.csv``
  (``global_step``, ``charts/episode_return`` = mean raw return of the episodes finished in
  that update's rollout), score from its printed deterministic evaluation;
* SB3: a worker process of this script; every finished episode's raw return (``Monitor``,
  under ``VecNormalize``) is recorded with ``model.num_timesteps``, then grouped by rollout
  (``n_envs * n_steps`` steps, the same batch as ours) into the same per-update mean; score =
  10 deterministic episodes with the observation statistics frozen, reset with the same seeds
  as ours (``seed + 10_000 + i``).

Both curves are then smoothed by a trailing mean over ``--window`` updates and plotted
(mean over seeds, shaded min-max) into ``<img-dir>/curves_ENV_vs_sb3.png``, against env
steps and against training seconds (equal wall time): ours the running sum of the
rollout and update seconds of ``metrics.csv``, SB3 the seconds into ``learn()`` at each
update's last step (interpolated between the episode time stamps); start-up and the final
evaluation are excluded on both sides. ``--backends gymnasium envpool`` adds a curve of ours
per backend (each with its preset, ``trpo.presets.BACKEND_PRESETS``); ``--sb3-seeds`` runs
SB3 on fewer seeds than ours.
Wall seconds are those of the whole subprocess (imports, env construction, training and the
final evaluation) on both sides. Usage (the numbers of docs/benchmarks.md)::

    python bench/curves_sb3.py --envs CartPole-v1 Pendulum-v1 --seeds 1 2 --steps 100000
    python bench/curves_sb3.py --envs Hopper-v5 --seeds 1 2 3 --sb3-seeds 1 --steps 1000000 \
        --backends gymnasium envpool

Check the machine's load first (``uptime``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["per_update_means", "read_ours_curve", "smooth", "plot_curves", "main"]

_ROOT = Path(__file__).resolve().parents[1]
_EVAL_RE = re.compile(r"evaluation over (\d+) episodes: mean return (-?[\d.]+)")
_COLOURS = {"ours": "tab:blue", "ours-envpool": "tab:green", "sb3": "tab:orange"}
_LABELS = {
    "ours": "ours (natgrad TRPO, gymnasium)",
    "ours-envpool": "ours, envpool preset",
    "sb3": "sb3-contrib TRPO",
}


# ----------------------------------------------------------------------------- curves
def per_update_means(
    steps: np.ndarray, returns: np.ndarray, batch: int, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean return of the episodes finished in each rollout of ``batch`` steps.

    An episode that ended at step ``t`` (counted after the step, so 1-based) belongs to
    rollout ``k = ceil(t / batch)``, plotted at ``x = k * batch``: the ``global_step`` our
    logger writes after that update.

    Args:
        steps: ``(E,)`` env step at which each episode ended.
        returns: ``(E,)`` raw undiscounted return of each episode.
        batch: Steps per rollout (``n_envs * n_steps``), > 0.
        total: Steps trained; the number of rollouts is ``ceil(total / batch)``.

    Returns:
        ``x`` of shape ``(K,)`` and the means ``(K,)`` (NaN where no episode ended).
    """
    if batch <= 0:
        raise ValueError(f"batch must be > 0, got {batch}")
    n = math.ceil(total / batch)
    k = np.clip(np.ceil(np.asarray(steps, dtype=np.float64) / batch).astype(int), 1, n) - 1
    sums = np.bincount(k, weights=np.asarray(returns, dtype=np.float64), minlength=n)
    counts = np.bincount(k, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return np.arange(1, n + 1) * batch, means


def read_ours_curve(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``global_step``, ``charts/episode_return`` and the training seconds so far (the running
    sum of ``time/rollout_seconds + time/update_seconds``) of a run's ``metrics.csv``."""
    xs, ys, ts = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            value = row.get("charts/episode_return", "")
            xs.append(int(float(row["global_step"])))
            ys.append(float(value) if value not in ("", None) else float("nan"))
            ts.append(float(row["time/rollout_seconds"]) + float(row["time/update_seconds"]))
    return np.asarray(xs), np.asarray(ys), np.cumsum(ts)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite points (NaN points are skipped).

    ``out[i] = mean(y[j] for j in (i - window, i] if y[j] is finite)``; NaN if none is.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - window, 0)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def plot_curves(
    curves: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    path: Path,
    *,
    title: str,
    window: int,
) -> None:
    """Mean over seeds (line) and min-max over seeds (band) per library, smoothed, against
    env steps (left) and against training seconds (right: equal wall time).

    Args:
        curves: ``{side: [(steps, returns, seconds) per seed]}``; the seeds of one side share
            the same step grid up to length (truncated to the shortest); their seconds are
            averaged.
        path: PNG to write.
        title: Plot title.
        window: Smoothing window in updates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, sharey=True)
    for side, runs in curves.items():
        if not runs:
            continue
        n = min(len(x) for x, _, _ in runs)
        x, t = runs[0][0][:n], np.mean([t[:n] for _, _, t in runs], axis=0)
        ys = np.stack([smooth(y[:n], window) for _, y, _ in runs])
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(ys, axis=0)
        colour = _COLOURS.get(side)
        for ax, xs in zip(axes, (x, t)):
            ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=colour,
                            alpha=0.2)
            seeds = f"{len(runs)} seed" + ("s" if len(runs) != 1 else "")
            ax.plot(xs, mean, color=colour, lw=2, label=f"{_LABELS.get(side, side)} ({seeds})")
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("training seconds (rollouts + updates; mean over seeds)")
    axes[0].set_ylabel(f"training episode return (trailing mean of {window} updates)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- SB3 worker
def run_sb3_worker(env_id: str, seed: int, steps: int, eval_episodes: int, out: Path) -> dict:
    """Train sb3-contrib's TRPO with the env's preset; write every episode to ``out`` (CSV)."""
    import torch
    from compare_sb3 import _evaluate, make_sb3_env, sb3_kwargs, settings_for
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback

    s = settings_for(env_id, "preset", "sync")
    env, vecnorm = make_sb3_env(env_id, s, seed)  # Monitor-wrapped by make_vec_env
    episodes: list[tuple[int, float, float]] = []

    class Record(BaseCallback):
        """(num_timesteps, raw return, seconds into learn()) of every finished episode."""

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes.append((int(self.num_timesteps), float(info["episode"]["r"]),
                                     time.perf_counter() - start))
            return True

    model = TRPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **sb3_kwargs(s))
    start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=Record())
    if vecnorm is not None:
        vecnorm.training = False  # freeze the statistics for evaluation

    def act(obs: np.ndarray) -> np.ndarray:
        x = vecnorm.normalize_obs(obs) if vecnorm is not None and s["normalize_obs"] else obs
        return model.predict(x, deterministic=True)[0]

    returns = _evaluate(act, env_id, eval_episodes, seed + 10_000) if eval_episodes else []
    env.close()
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["global_step", "episode_return", "train_seconds"])
        writer.writerows(episodes)
    return dict(
        steps=int(model.num_timesteps),
        batch=s["n_envs"] * s["n_steps"],
        eval_return=float(np.mean(returns)) if returns else float("nan"),
        torch_threads=torch.get_num_threads(),
    )


# ----------------------------------------------------------------------------- driver
def _child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_ours(env_id: str, seed: int, args: argparse.Namespace,
              backend: str = "gymnasium") -> dict[str, Any]:
    name = f"ours_{env_id}_{seed}" + ("" if backend == "gymnasium" else f"_{backend}")
    cmd = [
        sys.executable, "-m", "trpo.run", "--env-id", env_id, "--seed", str(seed),
        "--total-steps", str(args.steps), "--runs-root", str(args.out), "--run-name", name,
        "--no-progress", "--torch-threads", "1", "--no-plot", "--no-tensorboard",
        "--eval-episodes", str(args.eval_episodes), "--env-backend", backend,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=_ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ours on {env_id} seed {seed} failed:\n{proc.stderr[-4000:]}")
    match = _EVAL_RE.search(proc.stdout)
    x, y, t = read_ours_curve(args.out / name / "metrics.csv")
    score = float(match.group(2)) if match else float("nan")
    return dict(wall_s=wall, eval_return=score, x=x, y=y, t=t)


def _run_sb3(env_id: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    episodes = args.out / f"sb3_{env_id}_{seed}_episodes.csv"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--envs", env_id,
        "--seeds", str(seed), "--steps", str(args.steps), "--out", str(args.out),
        "--eval-episodes", str(args.eval_episodes),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=_ROOT)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"sb3 on {env_id} seed {seed} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(lines[-1][len("RESULT ") :])
    data = np.loadtxt(episodes, delimiter=",", skiprows=1, ndmin=2)
    x, y = per_update_means(data[:, 0], data[:, 1], res["batch"], res["steps"])
    # Training seconds at each update's last step, from the episodes' time stamps.
    t = np.interp(x, data[:, 0], data[:, 2])
    return dict(wall_s=wall, eval_return=res["eval_return"], x=x, y=y, t=t)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--window", type=int, default=5, help="smoothing window, in updates")
    p.add_argument("--out", type=Path, default=Path("runs/curves_sb3"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    p.add_argument("--backends", nargs="+", default=["gymnasium"],
                   choices=["gymnasium", "envpool"], help="ours: one curve per backend")
    p.add_argument("--sb3-seeds", type=int, nargs="*", default=None,
                   help="seeds SB3 runs (default: --seeds)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        env_id, seed = args.envs[0], args.seeds[0]
        out = args.out / f"sb3_{env_id}_{seed}_episodes.csv"
        print("RESULT " + json.dumps(run_sb3_worker(env_id, seed, args.steps,
                                                    args.eval_episodes, out)), flush=True)  # fmt: skip
        return 0

    print(f"curves_sb3: {os.cpu_count()} cpus, load {_load()}", flush=True)
    rows = []
    for env_id in args.envs:
        curves: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        sb3_seeds = args.seeds if args.sb3_seeds is None else args.sb3_seeds
        for seed in args.seeds:
            runs = [(f"ours{'' if b == 'gymnasium' else '-' + b}",
                     lambda e, s_, a, b=b: _run_ours(e, s_, a, b)) for b in args.backends]
            runs += [("sb3", _run_sb3)] if seed in sb3_seeds else []
            for side, fn in runs:
                res = fn(env_id, seed, args)
                curves.setdefault(side, []).append((res["x"], res["y"], res["t"]))
                rows.append((side, env_id, seed, res["wall_s"], res["eval_return"]))
                print(
                    f"  {side:<4} {env_id} seed {seed}: {res['wall_s']:.1f} s, eval "
                    f"{res['eval_return']:.1f}, load {_load()}",
                    flush=True,
                )
        png = args.img_dir / f"curves_{env_id}_vs_sb3.png"
        steps = f"{args.steps // 1000}k" if args.steps % 1000 == 0 else str(args.steps)
        plot_curves(curves, png, title=f"{env_id}, {steps} steps, preset", window=args.window)
        print(f"  wrote {png}", flush=True)
    print()
    print(
        f"| library | env | seed | wall s | eval return ({args.eval_episodes} ep., deterministic) |"
    )
    print("|---|---|---:|---:|---:|")
    for side, env_id, seed, wall, ev in rows:
        print(f"| {_LABELS[side]} | {env_id} | {seed} | {wall:.0f} | {ev:.1f} |")
    print(f"load average at the end: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
