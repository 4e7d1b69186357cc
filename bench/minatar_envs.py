"""MinAtar (``pip install minatar``) games as uint8 image envs, registered with gymnasium.

MinAtar's own gymnasium envs (``minatar.gym.register_envs()`` registers
``MinAtar/Breakout-v1`` etc.) observe a ``bool`` Box of shape ``(10, 10, C)`` (one channel per
object kind). Importing this module registers ``MinAtarImg/<Game>-v1`` for each game: the same
env (minimal action set, MinAtar's defaults: sticky actions with probability 0.1, difficulty
ramping) whose observation is that array as ``uint8`` 0/255, a ``Box(0, 255, (10, 10, C),
uint8)``. That is what both image pipelines expect: this project's ``--policy auto`` picks its
CNN for uint8 ``(H, W, C)`` images (scaled by 1/255), and SB3's ``CnnPolicy`` recognises it as an
image (transposed to channels first and scaled by 1/255 there).

MinAtar has no step limit of its own (a good Breakout or Space Invaders agent could play
forever), so the ids carry ``max_episode_steps = MAX_EPISODE_STEPS`` (a truncation, which both
learners bootstrap).

Usage::

    PYTHONPATH=. python -m trpo.run --env bench.minatar_envs:MinAtarImg/Breakout-v1
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import register

__all__ = ["GAMES", "MAX_EPISODE_STEPS", "MinAtarImage", "make_image_env"]

GAMES = {  # id name -> MinAtar's game module
    "Asterix": "asterix",
    "Breakout": "breakout",
    "Freeway": "freeway",
    "Seaquest": "seaquest",
    "SpaceInvaders": "space_invaders",
}
MAX_EPISODE_STEPS = 10_000


class MinAtarImage(gym.ObservationWrapper):
    """MinAtar's bool ``(10, 10, C)`` state as a uint8 0/255 image."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Box(
            0, 255, shape=env.observation_space.shape, dtype=np.uint8
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation, dtype=np.uint8) * np.uint8(255)


def make_image_env(game: str, render_mode: str | None = None, **kwargs) -> gym.Env:
    """``minatar.gym.BaseEnv(game, use_minimal_action_set=True)`` wrapped by :class:`MinAtarImage`."""
    from minatar.gym import BaseEnv

    kwargs.setdefault("use_minimal_action_set", True)
    return MinAtarImage(BaseEnv(game, render_mode=render_mode, **kwargs))


for _name, _game in GAMES.items():
    if f"MinAtarImg/{_name}-v1" not in gym.registry:
        register(
            id=f"MinAtarImg/{_name}-v1",
            entry_point="bench.minatar_envs:make_image_env",
            kwargs=dict(game=_game),
            max_episode_steps=MAX_EPISODE_STEPS,
        )
