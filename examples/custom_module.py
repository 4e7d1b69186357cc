"""Your own networks in TRPO (docs/policies.md): an actor and a critic ``nn.Module`` on
Pendulum-v1, given as modules from Python or as factories by import path.

    python examples/custom_module.py --total-steps 20000
    python examples/custom_module.py --total-steps 200000 --compare --seed 1  # vs built-in MLP
    PYTHONPATH=examples python -m trpo.run --env Pendulum-v1 \\
        --actor-factory custom_module:make_actor --critic-factory custom_module:make_critic
    PYTHONPATH=examples python -m trpo.evaluate RUN_DIR --allow-import

A factory is called as ``factory(observation_space, action_space)`` with the single-env spaces.
"""

from __future__ import annotations

import argparse
import math

import gymnasium as gym
import torch
from torch import nn

from trpo import config_for, train
from trpo.policy import make_actor as builtin_actor
from trpo.policy import make_critic as builtin_critic


def make_actor(observation_space: gym.Space, action_space: gym.Space) -> nn.Module:
    """The mean of the Gaussian, ``(B, d)``; trpo adds the state-independent ``log_std (d,)``
    (return ``(mean, log_std)`` to own it)."""
    n, d = math.prod(observation_space.shape), action_space.shape[0]
    return nn.Sequential(nn.Linear(n, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, d))


def make_critic(observation_space: gym.Space, action_space: gym.Space) -> nn.Module:
    """Values ``(B, 1)`` (``(B,)`` works too)."""
    n = math.prod(observation_space.shape)
    return nn.Sequential(nn.Linear(n, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def copy_builtin_init(actor: nn.Module, critic: nn.Module, spaces: tuple, seed: int) -> None:
    """Give the modules the weights the built-in MLPs get with ``seed`` (for --compare)."""
    torch.manual_seed(seed)  # as trpo.train seeds the built-in networks
    ref_actor, ref_critic = builtin_actor(*spaces), builtin_critic(spaces[0])
    with torch.no_grad():
        for ref, mine in ((ref_actor, actor), (ref_critic, critic)):
            linears = [m for m in mine if isinstance(m, nn.Linear)]
            for layer, lin in zip(ref.layers, linears):
                lin.weight.copy_(layer.weight)
                lin.bias.copy_(layer.bias)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-steps", type=int, default=200_000)
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compare", action="store_true", help="also train the built-in MLP")
    args = parser.parse_args(argv)
    env = gym.make("Pendulum-v1")
    spaces = env.observation_space, env.action_space
    env.close()
    config = config_for(
        "Pendulum-v1", total_steps=args.total_steps, seed=args.seed, runs_root=args.runs_root
    )
    actor, critic = make_actor(*spaces), make_critic(*spaces)
    if args.compare:
        copy_builtin_init(actor, critic, spaces, config.seed)
    result = train(config, actor=actor, critic=critic)
    # result.actor.net is the module above, trained; the checkpoints hold its state dict.
    if args.compare:
        builtin = train(config)
        for name, r in (("your module", result), ("built-in MLP", builtin)):
            last = [x for x in r.metrics["charts/episode_return"] if x is not None][-5:]
            print(f"{name}: last 5 updates' training return {sum(last) / len(last):.1f}, "
                  f"evaluation {r.eval_mean:.1f}")
    return result.eval_mean


if __name__ == "__main__":
    main()
