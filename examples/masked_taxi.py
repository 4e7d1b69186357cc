"""Action masking on Taxi-v4 (docs/policies.md): the same run with and without masks.

    python examples/masked_taxi.py --total-steps 100000 --seeds 1 2 3

Taxi's ``info["action_mask"]`` marks the moves into walls and the illegal pick-ups and
drop-offs (-10 each) as invalid; with ``action_masks="auto"`` (the default) the policy never
samples them. (Taxi-v3 is deprecated in gymnasium 1.x; v4 has the same dynamics and masks.)
"""

from __future__ import annotations

import argparse

from trpo import TRPOConfig, train


def run(action_masks: str, seed: int, total_steps: int, runs_root: str) -> list[float]:
    """The mean training return of each update (``charts/episode_return``)."""
    config = TRPOConfig(
        env_id="Taxi-v4", action_masks=action_masks, seed=seed, total_steps=total_steps,
        n_envs=4, n_steps=512, gamma=0.99, max_kl=0.02, eval_episodes=0, plot=False,
        progress=False, tensorboard=False, runs_root=runs_root,
    )
    return train(config).metrics["charts/episode_return"]


def main(argv: list[str] | None = None) -> dict[str, list[list[float]]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--runs-root", default="runs")
    args = parser.parse_args(argv)
    curves = {
        mode: [run(mode, s, args.total_steps, args.runs_root) for s in args.seeds]
        for mode in ("on", "off")
    }
    for mode, runs in curves.items():
        finals = [c[-1] for c in runs]
        print(f"masks {mode:>3}: final training return per seed {[round(f, 1) for f in finals]}")
    return curves


if __name__ == "__main__":
    main()
