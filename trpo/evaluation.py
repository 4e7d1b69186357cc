"""Deterministic evaluation of a trained policy, as a function and as a command.

    python -m trpo.evaluate RUN_DIR [--episodes 10] [--seed 0] [--video]

loads the run's ``config.json`` and newest valid checkpoint, runs the deterministic policy
(argmax / Gaussian mean) with the observation statistics frozen, prints the returns, and with
``--video`` writes ``RUN_DIR/eval.gif`` when the env renders rgb arrays.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from trpo.normalize import RunningMeanStd
from trpo.policy import Actor, make_actor, mode
from trpo.rollout import env_action_converter

__all__ = ["evaluate_policy", "load_policy", "main"]


def evaluate_policy(
    actor: Actor,
    env_id: str,
    *,
    episodes: int = 10,
    obs_normalizer: RunningMeanStd | None = None,
    seed: int = 0,
    video_path: str | Path | None = None,
    max_video_frames: int = 1000,
) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes of the deterministic policy.

    Args:
        actor: The policy; its mode (argmax, mean, per-head argmax, ``logits > 0``) is played.
        env_id: Gymnasium id.
        episodes: Number of episodes (≥ 1), episode ``i`` reset with seed ``seed + i``.
        obs_normalizer: Statistics the actor was trained with; used frozen (never updated).
        seed: Base seed.
        video_path: If given, the first episode is rendered (``render_mode="rgb_array"``) into
            this GIF file (needs Pillow, which matplotlib brings). When the env's renderer is
            not installed (e.g. pygame for classic control) a warning is issued, no file is
            written, and the returns are still computed.
        max_video_frames: Frames kept for the GIF.

    Returns:
        One return per episode.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = gym.make(env_id, render_mode="rgb_array" if video_path is not None else None)
    to_env = env_action_converter(env.action_space)
    param = next(actor.parameters())
    frames: list[np.ndarray] = []
    returns: list[float] = []
    recording = video_path is not None

    def grab() -> None:
        nonlocal recording
        if len(frames) >= max_video_frames:
            return
        try:
            frame = env.render()
        except gym.error.DependencyNotInstalled as e:
            # A missing renderer (pygame, OpenGL) costs the video, not the evaluation.
            warnings.warn(f"no video written: {e}", stacklevel=3)
            recording = False
            return
        if frame is not None:
            frames.append(np.asarray(frame))

    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            if recording and i == 0:
                grab()
            done, total = False, 0.0
            while not done:
                x = torch.as_tensor(np.asarray(obs), dtype=param.dtype, device=param.device)
                if obs_normalizer is not None:
                    x = obs_normalizer.normalize(x)
                with torch.inference_mode():
                    action = mode(actor.family, actor(x.unsqueeze(0)))[0]
                obs, reward, terminated, truncated, _ = env.step(to_env(action.cpu().numpy()))
                total += float(reward)
                done = bool(terminated or truncated)
                if recording and i == 0:
                    grab()
            returns.append(total)
    finally:
        env.close()
    if video_path is not None and frames:
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        fps = env.metadata.get("render_fps", 30) or 30
        images[0].save(
            video_path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0
        )
    return returns


def load_policy(run_dir: str | Path) -> tuple[Actor, RunningMeanStd | None, str]:
    """The actor, frozen observation statistics and env id of a run's newest valid checkpoint."""
    from trpo.checkpoint import load_latest_checkpoint
    from trpo.config import load_config

    config = load_config(run_dir)
    env = gym.make(config.env_id)
    try:
        actor = make_actor(env.observation_space, env.action_space, config.hidden_sizes)
    finally:
        env.close()
    actor = actor.to(dtype=config.torch_dtype())
    state = load_latest_checkpoint(run_dir).state
    actor.load_state_dict(state["actor"])
    obs_rms = None
    if "obs_rms" in state:
        obs_rms = RunningMeanStd(tuple(env.observation_space.shape), clip=config.obs_clip)
        obs_rms.load_state_dict(state["obs_rms"])
        obs_rms.frozen = True
    return actor, obs_rms, config.env_id


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: evaluate the newest checkpoint of a run directory."""
    parser = argparse.ArgumentParser(
        prog="python -m trpo.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="run directory written by python -m trpo.run")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video", action="store_true", help="write RUN_DIR/eval.gif")
    args = parser.parse_args(argv)
    actor, obs_rms, env_id = load_policy(args.run_dir)
    video = Path(args.run_dir) / "eval.gif" if args.video else None
    returns = evaluate_policy(
        actor,
        env_id,
        episodes=args.episodes,
        obs_normalizer=obs_rms,
        seed=args.seed,
        video_path=video,
    )
    print(
        f"{env_id}: mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over "
        f"{len(returns)} episodes"
    )
    if video is not None:
        print(f"video: {video}" if video.exists() else "video: none (see the warning above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
