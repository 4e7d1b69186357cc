"""Image observations with the built-in CNN (docs/policies.md): ``--policy auto`` picks the
Nature-CNN-like network for a uint8 ``(H, W, C)`` Box observation space.

    PYTHONPATH=examples python -m trpo.run --env image_policy:ColorPick-v0 --policy auto \\
        --total-steps 20000
    python examples/image_policy.py --total-steps 20000

``ColorPick-v0`` is a tiny synthetic env registered by importing this module: a 12×12 RGB image
filled with noise, one channel brighter; the reward is 1 for naming that channel.
``ColorPickDict-v0`` puts the image in a Dict next to a vector (``--env
image_policy:ColorPickDict-v0``): the image part gets the CNN, the vector joins its features.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

from trpo import TRPOConfig, train


class ColorPick(gym.Env):
    """Observation: uint8 (12, 12, 3); action: Discrete(3), the brightest channel; 16 steps."""

    observation_space = gym.spaces.Box(0, 255, (12, 12, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def _image(self) -> np.ndarray:
        self.answer = int(self.np_random.integers(3))
        img = self.np_random.integers(0, 128, (12, 12, 3))
        img[..., self.answer] += 100
        return img.astype(np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._image(), {}

    def step(self, action):
        reward = float(int(action) == self.answer)
        self.t += 1
        return self._image(), reward, False, self.t >= 16, {}


class ColorPickDict(ColorPick):
    """The same task with a Dict observation: ``{"image": the image, "clock": (t/16, noise)}``;
    ``--policy auto`` gives the image part its own CNN (trpo.networks.PartsNet)."""

    observation_space = gym.spaces.Dict(
        {"image": ColorPick.observation_space, "clock": gym.spaces.Box(-5, 5, (2,), np.float32)}
    )

    def _image(self) -> dict:
        clock = np.array([getattr(self, "t", 0) / 16, self.np_random.normal()], np.float32)
        return {"image": super()._image(), "clock": clock}


gym.register("ColorPick-v0", entry_point=ColorPick)
gym.register("ColorPickDict-v0", entry_point=ColorPickDict)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-steps", type=int, default=20_000)
    parser.add_argument("--runs-root", default="runs")
    args = parser.parse_args(argv)
    config = TRPOConfig(
        env_id="image_policy:ColorPick-v0", policy="auto", total_steps=args.total_steps,
        n_envs=2, n_steps=256, eval_episodes=5, runs_root=args.runs_root, progress=False,
    )
    result = train(config)  # result.actor.net is the trpo.networks.NatureCNN
    return result.eval_mean


if __name__ == "__main__":
    main()
