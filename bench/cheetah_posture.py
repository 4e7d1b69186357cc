"""Why HalfCheetah-v5 seeds end far apart: the posture of each trained policy.

    python bench/cheetah_posture.py runs/learning/HalfCheetah-v5__seed1 ...

Plays one deterministic episode (reset seed 0) of each run's policy and reports its return,
the mean torso pitch (``qpos[2]``, degrees; 0 = upright, ±180 = on its back) and the fraction
of steps spent flipped (|pitch| > 90°). A run that learned to gallop on its back sits in the
well-known local optimum of about 1,500-2,500.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch

from trpo.evaluation import load_policy
from trpo.policy import mode


def posture(run_dir: str, steps: int = 1000) -> tuple[float, float, float]:
    """``(return, mean pitch in degrees, fraction of steps flipped)`` of one episode."""
    actor, obs_rms, env_id = load_policy(run_dir)
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    total, pitch = 0.0, []
    for _ in range(steps):
        x = torch.as_tensor(obs, dtype=next(actor.parameters()).dtype)
        x = obs_rms.normalize(x) if obs_rms is not None else x
        with torch.no_grad():
            action = mode(actor.family, actor(x[None]))[0].numpy()
        obs, reward, terminated, truncated, _ = env.step(np.clip(action, -1, 1))
        total += float(reward)
        pitch.append(float(env.unwrapped.data.qpos[2]))
        if terminated or truncated:
            break
    env.close()
    p = np.array(pitch)
    return total, float(np.degrees(p.mean())), float(np.mean(np.abs(p) > np.pi / 2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    print("| run | return | mean pitch | flipped |")
    print("|---|---|---|---|")
    for run_dir in args.run_dirs:
        ret, deg, flipped = posture(run_dir)
        print(f"| {run_dir.rstrip('/').split('/')[-1]} | {ret:.0f} | {deg:.0f}° | {flipped:.2f} |")


if __name__ == "__main__":
    main()
