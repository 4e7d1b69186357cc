"""Your own networks in TRPO (docs/policies.md): an actor and a critic ``nn.Module`` on
Pendulum-v1, given as modules from Python or as factories by import path.

    python examples/custom_module.py --total-steps 20000
    PYTHONPATH=examples python -m trpo.run --env Pendulum-v1 \\
        --actor-factory custom_module:make_actor --critic-factory custom_module:make_critic
    PYTHONPATH=examples python -m trpo.evaluate RUN_DIR --allow-import

A factory is called as ``factory(observation_space, action_space)`` with the single-env spaces.
"""

from __future__ import annotations

import argparse
import math

import gymnasium as gym
from torch import nn

from trpo import config_for, train


def make_actor(observation_space: gym.Space, action_space: gym.Space) -> nn.Module:
    """The mean of the Gaussian, ``(B, d)``; trpo adds the state-independent ``log_std (d,)``
    (return ``(mean, log_std)`` to own it)."""
    n, d = math.prod(observation_space.shape), action_space.shape[0]
    return nn.Sequential(nn.Linear(n, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, d))


def make_critic(observation_space: gym.Space, action_space: gym.Space) -> nn.Module:
    """Values ``(B, 1)`` (``(B,)`` works too)."""
    n = math.prod(observation_space.shape)
    return nn.Sequential(nn.Linear(n, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-steps", type=int, default=200_000)
    parser.add_argument("--runs-root", default="runs")
    args = parser.parse_args(argv)
    env = gym.make("Pendulum-v1")
    spaces = env.observation_space, env.action_space
    env.close()
    config = config_for("Pendulum-v1", total_steps=args.total_steps, runs_root=args.runs_root)
    result = train(config, actor=make_actor(*spaces), critic=make_critic(*spaces))
    # result.actor.net is the module above, trained; the checkpoints hold its state dict.
    return result.eval_mean


if __name__ == "__main__":
    main()
