"""Image observations: this project's TRPO (its built-in small-image CNN) against sb3-contrib's
TRPO ``CnnPolicy`` with the same network, on MinAtar games (``pip install minatar``).

The envs are ``MinAtarImg/<Game>-v1`` of :mod:`bench.minatar_envs` (MinAtar's 10×10×C state as
uint8 0/255 images). For each game and seed both sides train, one after the other, each in a
fresh subprocess (``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, ``torch.set_num_threads(1)``); which
side goes first alternates from one (game, seed) to the next, so both see the same machine
load on average. Then each final policy plays ``--eval-episodes`` deterministic episodes
(argmax action) in the same env, episode ``i`` reset with seed ``10_000 + i``, by the same loop.

Same network on both sides: actor and critic are two separate networks (SB3:
``share_features_extractor=False``), each ``x/255`` → conv 16 3×3 → ReLU → conv 32 3×3 → ReLU →
linear 128 → ReLU → MLP ``--hidden-sizes`` (tanh) → output; orthogonal init (gain √2, policy
output 0.01, value output 1), zero biases. Ours is ``trpo.networks.NatureCNN`` (picked by
``policy="auto"`` for uint8 images); SB3's is :class:`SmallImageCNN` below as
``features_extractor_class`` (SB3's own NatureCNN needs images of at least 36×36). SB3 scales
by 1/255 in its preprocessing (``normalize_images=True``), ours in the network; SB3 also
transposes the images to channels first (``VecTransposeImage``), ours in the network.

Same settings (our field name → sb3-contrib's): ``n_envs`` (DummyVecEnv / in-process vector
env), ``n_steps``, ``gamma``, ``gae_lambda``, ``max_kl`` → ``target_kl``, ``cg_iters`` →
``cg_max_steps``, ``cg_damping``, line search 0.8 × 10 tries, ``critic_lr`` → ``learning_rate``
(Adam), ``critic_epochs`` → ``n_critic_updates``, ``critic_minibatch_size`` → ``batch_size``,
advantages normalised, no observation/reward normalisation. Not matched: Adam's ε (SB3 1e-5,
ours torch's 1e-8), and our run writes its metrics CSV every update and one checkpoint at
the end (counted in its wall time).

Timed: the whole training call on each side (``trpo.train(config)``; SB3's env construction,
``TRPO(...)`` and ``learn()``), not the evaluation. Every result is appended to ``--out`` as one
JSON line as soon as it exists; results already there (same game, seed, side, steps and
settings) are reused, so an interrupted run continues where it stopped.

Usage (the numbers of docs/policies.md, "Images: MinAtar vs SB3-contrib CnnPolicy")::

    PYTHONPATH=. nice -n 10 python bench/minatar_vs_sb3.py --games Breakout SpaceInvaders \\
        --seeds 1 2 --steps 100000 --out /tmp/minatar_vs_sb3.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.compare_sb3 import _evaluate as evaluate_episodes
from bench.compare_sb3 import sb3_kwargs as mlp_sb3_kwargs

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 10_000


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The shared hyperparameters, in this project's field names."""
    return dict(
        n_envs=args.n_envs,
        n_steps=args.n_steps,
        gamma=args.gamma,
        gae_lambda=args.gae_lambda,
        max_kl=args.max_kl,
        cg_iters=args.cg_iters,
        cg_damping=0.1,
        line_search_shrink=0.8,
        line_search_max_tries=10,
        critic_lr=args.critic_lr,
        critic_epochs=args.critic_epochs,
        critic_minibatch_size=args.critic_minibatch_size,
        normalize_advantages=True,
        hidden_sizes=list(args.hidden_sizes),
    )


# ----------------------------------------------------------------------------- workers
def _evaluate(act, env_id: str, episodes: int) -> list[float]:
    """Returns of ``episodes`` episodes of ``act`` (obs -> action), reset with EVAL_SEED + i
    (bench/compare_sb3.py's loop)."""
    return evaluate_episodes(act, env_id, episodes, EVAL_SEED)


def _small_image_cnn():
    """SB3 features extractor with our small-image CNN's layers (defined lazily: SB3 is only
    imported by the SB3 worker)."""
    import torch
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from torch import nn

    class SmallImageCNN(BaseFeaturesExtractor):
        """``(B, C, H, W)`` images already scaled to [0, 1] by SB3 → 128 features: conv 16
        3×3, ReLU, conv 32 3×3, ReLU, flatten, linear 128, ReLU (``trpo.networks.NatureCNN``
        for images smaller than 36×36, without its /255 and transpose, done by SB3)."""

        def __init__(self, observation_space, features_dim: int = 128):
            super().__init__(observation_space, features_dim)
            c = observation_space.shape[0]
            self.cnn = nn.Sequential(
                nn.Conv2d(c, 16, 3, 1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, 1),
                nn.ReLU(),
                nn.Flatten(),
            )
            with torch.no_grad():
                n = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
            self.linear = nn.Sequential(nn.Linear(n, features_dim), nn.ReLU())

        def forward(self, x):
            return self.linear(self.cnn(x))

    return SmallImageCNN


def sb3_kwargs(s: dict[str, Any]) -> dict[str, Any]:
    """sb3-contrib ``TRPO("CnnPolicy", ...)`` keyword arguments for shared settings ``s``: the
    mapping of :func:`bench.compare_sb3.sb3_kwargs`, with the small-image CNN as features
    extractor (actor and critic each their own, as ours)."""
    from torch import nn

    kwargs = mlp_sb3_kwargs({**s, "fvp_fraction": 1.0, "log_std_init": 0.0})
    kwargs["policy_kwargs"] = dict(
        features_extractor_class=_small_image_cnn(),
        features_extractor_kwargs=dict(features_dim=128),
        share_features_extractor=False,
        net_arch=dict(pi=list(s["hidden_sizes"]), vf=list(s["hidden_sizes"])),
        activation_fn=nn.Tanh,
        normalize_images=True,
    )
    return kwargs


def run_sb3(env_id: str, s: dict[str, Any], seed: int, steps: int, episodes: int) -> dict:
    import numpy as np
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv

    curve: list[list[float]] = []

    class Curve(BaseCallback):
        """(steps, seconds since the start, mean return of the last 20 episodes) per update."""

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            eps = [float(ep["r"]) for ep in self.model.ep_info_buffer][-20:]
            if eps:
                curve.append([self.num_timesteps, time.perf_counter() - t0, _mean(eps)])

    t0 = time.perf_counter()
    env = make_vec_env(env_id, n_envs=s["n_envs"], seed=seed, vec_env_cls=DummyVecEnv)
    model = TRPO("CnnPolicy", env, seed=seed, device="cpu", verbose=0, **sb3_kwargs(s))
    model.learn(total_timesteps=steps, callback=Curve())
    wall = time.perf_counter() - t0
    train_returns = [float(ep["r"]) for ep in model.ep_info_buffer][-20:]
    env.close()
    returns = _evaluate(
        lambda obs: int(model.predict(np.asarray(obs), deterministic=True)[0]), env_id, episodes
    )
    params = sum(p.numel() for p in model.policy.parameters())
    return dict(
        steps=int(model.num_timesteps),
        wall_s=wall,
        eval_returns=returns,
        train_return=_mean(train_returns),
        params=params,
        curve=curve,
    )


def run_ours(env_id: str, s: dict[str, Any], seed: int, steps: int, episodes: int) -> dict:
    import numpy as np
    import torch

    from trpo import train
    from trpo.config import TRPOConfig
    from trpo.policy import mode

    fields = dict(s, hidden_sizes=tuple(s["hidden_sizes"]))
    with tempfile.TemporaryDirectory() as runs_root:
        config = TRPOConfig(
            env_id=env_id,
            total_steps=steps,
            seed=seed,
            policy="auto",
            torch_threads=1,
            eval_episodes=0,
            plot=False,
            tensorboard=False,
            progress=False,
            checkpoint_every=10**9,
            runs_root=runs_root,
            **fields,
        )
        t0 = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - t0
    actor = result.actor
    if type(actor.net).__name__ != "NatureCNN":
        raise RuntimeError(f"expected the built-in CNN, got {type(actor.net).__name__}")

    def act(obs):
        with torch.inference_mode():
            dist = actor(torch.as_tensor(np.asarray(obs), dtype=torch.float32).unsqueeze(0))
            return int(mode(actor.family, dist)[0])

    returns = _evaluate(act, env_id, episodes)
    train_returns = [x for x in result.metrics.get("charts/episode_return", []) if x == x]
    curve = _our_curve(result.metrics, wall)
    params = sum(p.numel() for p in actor.parameters()) + sum(
        p.numel() for p in result.critic.parameters()
    )
    return dict(
        steps=int(result.global_step),
        wall_s=wall,
        eval_returns=returns,
        train_return=_mean(train_returns[-3:]),
        params=params,
        curve=curve,
    )


def _our_curve(m: dict[str, list], wall: float) -> list[list[float]]:
    """(steps, seconds, mean training return of the last 5 updates with episodes) per update;
    seconds = the cumulative rollout + update time, rescaled so that the last point is the
    whole timed call (the metrics do not time set-up and logging)."""
    busy, total, seen, out = [], 0.0, [], []
    for r, u in zip(m["time/rollout_seconds"], m["time/update_seconds"]):
        total += float(r) + float(u)
        busy.append(total)
    for step, t, ret in zip(m["global_step"], busy, m["charts/episode_return"]):
        if ret is not None and ret == ret:
            seen.append(float(ret))
        if seen:
            out.append([int(step), t * wall / total, _mean(seen[-5:])])
    return out


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def worker(args: argparse.Namespace) -> None:
    """Run one side once; print its result as one JSON line."""
    import torch

    import bench.minatar_envs  # noqa: F401  (registers MinAtarImg/*)

    torch.set_num_threads(1)
    # The first torch.optim.Adam imports torch._dynamo (seconds): pay it before the clock.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    fn = {"sb3": run_sb3, "ours": run_ours}[args.worker]
    out = fn(args.env, json.loads(args.settings), args.seed, args.steps, args.eval_episodes)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver
def _run(side: str, env_id: str, settings: dict, seed: int, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        side,
        "--env",
        env_id,
        "--seed",
        str(seed),
        "--steps",
        str(args.steps),
        "--eval-episodes",
        str(args.eval_episodes),
        "--settings",
        json.dumps(settings),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{side} on {env_id} seed {seed} failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _table(rows: list[dict], games: list[str], seeds: list[int]) -> str:
    def cell(r: dict) -> str:
        xs = r["eval_returns"]
        m = sum(xs) / len(xs)
        sd = (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5
        return f"{m:.2f} ± {sd:.2f}"

    out = [
        "| game | seed | ours return | SB3 return | ours wall s | SB3 wall s | SB3 / ours wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for game in games:
        for seed in seeds:
            by = {r["side"]: r for r in rows if r["game"] == game and r["seed"] == seed}
            if set(by) != {"ours", "sb3"}:
                continue
            o, b = by["ours"], by["sb3"]
            out.append(
                f"| {game} | {seed} | {cell(o)} | {cell(b)} | {o['wall_s']:.0f} | "
                f"{b['wall_s']:.0f} | {b['wall_s'] / o['wall_s']:.2f} |"
            )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Training return against env steps and against wall seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = sorted({r["game"] for r in rows})
    fig, axes = plt.subplots(len(games), 2, figsize=(10, 3.6 * len(games)), squeeze=False)
    for (ax_steps, ax_wall), game in zip(axes, games):
        for r in (r for r in rows if r["game"] == game and r.get("curve")):
            c = list(zip(*r["curve"]))
            style = dict(color="C0" if r["side"] == "ours" else "C1", alpha=0.8,
                         label=f"{'ours' if r['side'] == 'ours' else 'SB3'} seed {r['seed']}")
            ax_steps.plot(c[0], c[2], **style)
            ax_wall.plot(c[1], c[2], **style)
        for ax, x in ((ax_steps, "env steps"), (ax_wall, "wall seconds")):
            ax.set(xlabel=x, ylabel="training return", title=f"MinAtar {game}")
            ax.grid(alpha=0.3)
        ax_steps.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--games", nargs="+", default=["Breakout"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--n-envs", type=int, default=4)
    p.add_argument("--n-steps", type=int, default=256)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--max-kl", type=float, default=0.01)
    p.add_argument("--cg-iters", type=int, default=10)
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--critic-epochs", type=int, default=5)
    p.add_argument("--critic-minibatch-size", type=int, default=128)
    p.add_argument("--hidden-sizes", nargs="*", type=int, default=[64, 64])
    p.add_argument("--out", type=Path, default=Path("/tmp/minatar_vs_sb3.jsonl"))
    p.add_argument("--plot", type=Path, default=None, help="PNG of the learning curves")
    # worker mode (internal)
    p.add_argument("--worker", choices=["ours", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--env", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    settings = settings_from(args)
    print(f"settings: {json.dumps(settings)}; {args.steps} steps", flush=True)
    done = _load(args.out)
    rows = []
    k = 0
    for game in args.games:
        for seed in args.seeds:
            sides = ("ours", "sb3") if k % 2 == 0 else ("sb3", "ours")
            k += 1
            for side in sides:
                key = dict(game=game, seed=seed, side=side, steps=args.steps, settings=settings)
                old = [r for r in done if all(r.get(n) == v for n, v in key.items())]
                if old:
                    rows.append(old[-1])
                    print(f"{game} seed {seed} {side}: reused from {args.out}", flush=True)
                    continue
                load = os.getloadavg()[0]
                r = _run(side, f"MinAtarImg/{game}-v1", settings, seed, args)
                r["steps_done"] = r.pop("steps")  # the last update overshoots --steps
                r.update(key, load=[load, os.getloadavg()[0]])
                with args.out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                rows.append(r)
                m = sum(r["eval_returns"]) / len(r["eval_returns"])
                print(
                    f"{game} seed {seed} {side}: eval {m:.2f}, train {r['train_return']:.2f}, "
                    f"wall {r['wall_s']:.0f} s, {r['params']} params, 1-min load {load:.1f} → "
                    f"{r['load'][1]:.1f}",
                    flush=True,
                )
    print()
    print(_table(rows, args.games, args.seeds))
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
