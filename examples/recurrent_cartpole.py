"""Recurrent TRPO on a partially observed CartPole (docs/policies.md): GRU against MLP.

    python examples/recurrent_cartpole.py --total-steps 500000 --seeds 1 2 3 \
        --plot docs/img/cartpole_novel.png

``CartPoleNoVel-v1`` is CartPole-v1 with the two velocities removed from the observation
(cart position and pole angle only), as rl-zoo3 registers it: a memoryless policy cannot
tell which way the pole is moving, a recurrent one can infer it from the last positions.
Importing this module registers the id, so the command line takes it as
``--env-id recurrent_cartpole:CartPoleNoVel-v1`` with ``examples/`` on ``PYTHONPATH``
(or ``examples.recurrent_cartpole:CartPoleNoVel-v1`` from the repository root).

Prints, per policy and seed, the deterministic evaluation return (10 episodes) and the
best mean training return of 5 consecutive updates, and the first step at which it
reached 450.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

from trpo import TRPOConfig, train

ENV_ID = "CartPoleNoVel-v1"


class NoVelocity(gym.ObservationWrapper):
    """CartPole's observation ``(x, ẋ, θ, θ̇)`` without the velocities: ``(x, θ)``."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high
        self.observation_space = gym.spaces.Box(low[::2], high[::2], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[::2]


def make_cartpole_novel(**kwargs) -> gym.Env:
    return NoVelocity(gym.make("CartPole-v1", **kwargs))


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=make_cartpole_novel)


def run(policy: str, seed: int, total_steps: int, runs_root: str) -> dict:
    """One run: evaluation return, curve ``(steps, training returns)``."""
    config = TRPOConfig(
        env_id=ENV_ID, policy=policy, seed=seed, total_steps=total_steps, n_envs=8,
        n_steps=256, bptt_length=32, gamma=0.99, max_kl=0.01, eval_episodes=10, plot=False,
        progress=False, tensorboard=False, runs_root=runs_root,
    )
    result = train(config)
    m = result.metrics
    return {"eval": result.eval_mean, "steps": m["global_step"],
            "returns": m["charts/episode_return"]}


def _smooth(returns: list) -> np.ndarray:
    r = np.array([np.nan if x is None else x for x in returns], dtype=float)
    return np.array([np.nanmean(r[max(0, i - 4) : i + 1]) for i in range(len(r))])


def plot(runs: dict[str, list[dict]], seeds: list[int], path: str) -> None:
    """Training return (mean of 5 updates) against env steps, one line per policy and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, (policy, per_seed) in enumerate(runs.items()):
        for seed, r in zip(seeds, per_seed):
            ax.plot(r["steps"], _smooth(r["returns"]), color=f"C{k}", alpha=0.8,
                    label=f"{policy} seed {seed}")
    ax.set(xlabel="env steps", ylabel="training return", title=ENV_ID)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-steps", type=int, default=500_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--policies", nargs="+", default=["gru", "mlp"])
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--plot", default=None, help="PNG of the learning curves")
    args = parser.parse_args(argv)
    runs = {p: [run(p, s, args.total_steps, args.runs_root) for s in args.seeds]
            for p in args.policies}
    print("| policy | seed | eval return | best training return (5 updates) | reached 450 at |")
    print("|---|---|---|---|---|")
    for policy, per_seed in runs.items():
        for seed, r in zip(args.seeds, per_seed):
            smooth = _smooth(r["returns"])
            hit = np.flatnonzero(smooth >= 450)
            at = f"step {r['steps'][hit[0]]:,}" if hit.size else "not reached"
            print(f"| {policy} | {seed} | {r['eval']:.1f} | {np.nanmax(smooth):.1f} | {at} |")
    if args.plot:
        plot(runs, args.seeds, args.plot)
    return runs


if __name__ == "__main__":
    main()
