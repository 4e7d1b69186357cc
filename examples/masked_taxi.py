"""Action masking on Taxi-v4 (docs/policies.md): the same run with and without masks.

    python examples/masked_taxi.py --total-steps 100000 --seeds 1 2 3 --plot docs/img/taxi_masks.png

Taxi's ``info["action_mask"]`` marks the moves into walls and the illegal pick-ups and
drop-offs (-10 each) as invalid; with ``action_masks="auto"`` (the default) the policy never
samples them. (Taxi-v3 is deprecated in gymnasium 1.x; v4 has the same dynamics and masks.)
Prints, per setting and seed, the mean training return of the last 5 updates before a
quarter, half and all of the steps, and the first step at which the masked run's return
(mean of 5 updates) reached the unmasked run's final one.
"""

from __future__ import annotations

import argparse

import numpy as np

from trpo import TRPOConfig, train


def run(action_masks: str, seed: int, total_steps: int, runs_root: str) -> tuple[list, list]:
    """``(global steps, mean training return)`` of each update."""
    config = TRPOConfig(
        env_id="Taxi-v4", action_masks=action_masks, seed=seed, total_steps=total_steps,
        n_envs=4, n_steps=512, gamma=0.99, max_kl=0.02, eval_episodes=0, plot=False,
        progress=False, tensorboard=False, runs_root=runs_root,
    )
    metrics = train(config).metrics
    return metrics["global_step"], metrics["charts/episode_return"]


def _smooth(returns: list) -> np.ndarray:
    r = np.array([np.nan if x is None else x for x in returns], dtype=float)
    return np.array([np.nanmean(r[max(0, i - 4) : i + 1]) for i in range(len(r))])


def plot(runs: dict[str, list[tuple[list, list]]], seeds: list[int], path: str) -> None:
    """Training return (mean of 5 updates) against env steps, one line per setting and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, (mode, per_seed) in enumerate(runs.items()):
        for seed, (steps, returns) in zip(seeds, per_seed):
            ax.plot(steps, _smooth(returns), color=f"C{k}", alpha=0.8,
                    label=f"masks {mode}, seed {seed}")
    ax.set(xlabel="env steps", ylabel="training return", title="Taxi-v4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, list[tuple[list, list]]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--plot", default=None, help="PNG of the learning curves")
    args = parser.parse_args(argv)
    runs = {
        mode: [run(mode, s, args.total_steps, args.runs_root) for s in args.seeds]
        for mode in ("on", "off")
    }
    print("| masks | seed | return at 1/4 | at 1/2 | at the end | masked reaches unmasked final at |")
    print("|---|---|---|---|---|---|")
    for mode, per_seed in runs.items():
        for seed, (steps, returns) in zip(args.seeds, per_seed):
            r, n = _smooth(returns), len(returns)
            at = [r[max(0, int(round(f * n)) - 1)] for f in (0.25, 0.5, 1.0)]
            reach = ""
            if mode == "on":
                target = _smooth(runs["off"][args.seeds.index(seed)][1])[-1]
                hit = np.flatnonzero(r >= target)
                reach = f"step {steps[hit[0]]}" if hit.size else "not reached"
            print(f"| {mode} | {seed} | " + " | ".join(f"{x:.1f}" for x in at) + f" | {reach} |")
    if args.plot:
        plot(runs, args.seeds, args.plot)
    return runs


if __name__ == "__main__":
    main()
