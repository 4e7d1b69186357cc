"""Deterministic evaluation of a trained policy (the library part; the command line is
:mod:`trpo.evaluate`, which ``import trpo`` never imports, so that ``python -m
trpo.evaluate`` runs without runpy's "found in sys.modules" warning and
:mod:`trpo.train` can import :func:`evaluate_policy` at module level).

Safety (issue 13):

* every episode is capped at ``max_episode_steps`` (the env's own limit, else
  :data:`DEFAULT_MAX_EPISODE_STEPS`), with a warning when the cap ends one, so an env whose
  episodes never end cannot hang an evaluation;
* :func:`load_policy` refuses a ``"module:Env-v0"`` id read from a run directory's
  ``config.json`` unless ``allow_import=True`` (importing it would run that module's code);
* checkpoints of another env or network size are passed over like corrupted ones (with a
  warning naming each file skipped), and the GIF is written atomically, never through a link.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from natgrad.families import mask_logits
from trpo.checkpoint import check_state_shapes, load_latest_checkpoint
from trpo.config import CONFIG_FILENAME, load_config
from trpo.envs import env_module, make_env
from trpo.fileio import atomic_writer, read_regular_file
from trpo.masks import env_mask, mask_source
from trpo.modules import ModuleActor, check_user_modules
from trpo.networks import build_actor, pixel_mask
from trpo.normalize import RunningMeanStd
from trpo.policy import Actor, mode
from trpo.rollout import env_action_converter, numpy_mode_fn

__all__ = ["DEFAULT_MAX_EPISODE_STEPS", "evaluate_policy", "load_policy"]

DEFAULT_MAX_EPISODE_STEPS = 10_000
"""Episode cap of :func:`evaluate_policy` for envs without their own ``max_episode_steps``."""
_MAX_CONFIG_BYTES = 1 << 20


def _episode_cap(env: object, max_episode_steps: int | None) -> int:
    if max_episode_steps is not None:
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or (
            max_episode_steps < 1
        ):
            raise ValueError(f"max_episode_steps must be an int >= 1 (got {max_episode_steps!r})")
        return max_episode_steps
    spec = getattr(env, "spec", None)
    limit = getattr(spec, "max_episode_steps", None)
    return int(limit) if limit else DEFAULT_MAX_EPISODE_STEPS


def _check_finite(env_id: str, episode: int, step: int, obs: object, reward: object) -> None:
    # A NaN observation would be played as a NaN action and a NaN reward summed into the
    # return: name the env and the place instead of printing a NaN mean.
    if not (np.isfinite(np.asarray(obs, dtype=np.float64)).all() and np.isfinite(reward)):
        raise ValueError(
            f"env {env_id!r} returned a non-finite observation or reward at step {step} of "
            f"evaluation episode {episode}"
        )


def _write_gif(frames: list[np.ndarray], path: Path, fps: float) -> None:
    from PIL import Image  # matplotlib's dependency; imported only when a video is asked for

    images = [Image.fromarray(f) for f in frames]
    with atomic_writer(path) as f:  # a link at `path` is replaced, never written through
        images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:],
            duration=int(1000 / fps), loop=0,
        )


def evaluate_policy(
    actor: Actor,
    env_id: str,
    *,
    episodes: int = 10,
    obs_normalizer: RunningMeanStd | None = None,
    seed: int = 0,
    video_path: str | Path | None = None,
    max_video_frames: int = 1000,
    max_episode_steps: int | None = None,
    action_masks: str = "auto",
) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes of the deterministic policy.

    Args:
        actor: The policy; its mode (argmax, mean, per-head argmax, ``logits > 0``) is played.
        env_id: Gymnasium id (``"module:Env-v0"`` imports ``module``: the caller named it).
            Dict/Tuple observations are flattened as in training (:func:`trpo.envs.make_env`).
        episodes: Number of episodes (≥ 1), episode ``i`` reset with seed ``seed + i``.
        obs_normalizer: Statistics the actor was trained with; used frozen (never updated).
        seed: Base seed.
        video_path: If given, the first episode is rendered (``render_mode="rgb_array"``) into
            this GIF file (needs Pillow, which matplotlib brings), written atomically. When
            the env's renderer is not installed (e.g. pygame for classic control) a warning is
            issued, no file is written, and the returns are still computed.
        max_video_frames: Frames kept for the GIF.
        max_episode_steps: Cap on an episode's steps; None = the env's ``max_episode_steps``,
            else :data:`DEFAULT_MAX_EPISODE_STEPS`. An episode ended by the cap counts with
            the return of its first ``max_episode_steps`` steps, and a warning says so.
        action_masks: ``"auto"`` / ``"on"`` / ``"off"``: play the mode of the policy
            restricted to the valid actions where the env provides masks (:mod:`trpo.masks`).

    Returns:
        One return per episode.

    Raises:
        ValueError: if ``episodes`` or ``max_episode_steps`` is not a positive int, ``seed``
            is negative, the env id cannot be resolved, or the env returns a non-finite
            observation or reward (naming the episode and step).
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1 (got {episodes!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 (got {seed!r})")
    # No flattening notice: training (or load_policy) printed it already.
    env = make_env(
        env_id, render_mode="rgb_array" if video_path is not None else None, notice=False
    )
    cap = _episode_cap(env, max_episode_steps)
    to_env = env_action_converter(env.action_space)
    recorder = _Recorder(env, max_video_frames) if video_path is not None else None
    returns: list[float] = []
    capped = 0
    fast = numpy_mode_fn(actor, obs_normalizer)
    try:
        for i in range(episodes):
            obs, info = env.reset(seed=seed + i)
            if i == 0:
                source = mask_source(action_masks, env.action_space, info, env)
            _check_finite(env_id, i, 0, obs, 0.0)
            play = _Episode(env, env_id, i, actor, obs_normalizer, source, cap, to_env, fast)
            total, was_capped = play(obs, info, recorder if i == 0 else None)
            returns.append(total)
            capped += was_capped
    finally:
        env.close()
    if capped:
        warnings.warn(
            f"{capped} of {episodes} evaluation episode(s) of {env_id} did not end within "
            f"{cap} steps and were cut there (pass max_episode_steps to change the cap)",
            stacklevel=2,
        )
    if recorder is not None and recorder.frames:
        _write_gif(recorder.frames, Path(video_path), env.metadata.get("render_fps", 30) or 30)
    return returns


class _Recorder:
    """Up to ``max_frames`` rendered frames; a missing renderer (pygame, OpenGL) costs the
    video, with a warning, not the evaluation."""

    def __init__(self, env: gym.Env, max_frames: int) -> None:
        self.env, self.max_frames = env, max_frames
        self.frames: list[np.ndarray] = []
        self.active = True

    def grab(self) -> None:
        if not self.active or len(self.frames) >= self.max_frames:
            return
        try:
            frame = self.env.render()
        except gym.error.DependencyNotInstalled as e:
            warnings.warn(f"no video written: {e}", stacklevel=4)
            self.active = False
            return
        if frame is not None:
            self.frames.append(np.asarray(frame))


@dataclass
class _Episode:
    """One evaluation episode of the deterministic policy (masked where ``source`` says),
    cut at ``cap`` steps; ``__call__`` returns ``(undiscounted return, cut at the cap?)``.
    A recurrent actor's state (``hidden``) starts at zeros and runs through the episode."""

    env: gym.Env
    env_id: str
    index: int
    actor: Actor
    obs_normalizer: RunningMeanStd | None
    source: str | None
    cap: int
    to_env: Callable[[np.ndarray], np.ndarray]
    # The rollout's numpy policy with zero noise (trpo.rollout.numpy_mode_fn): the same mode
    # at a third of a torch forward's cost per step; None = the torch path below.
    numpy_mode: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None
    hidden: torch.Tensor | None = None

    def action(self, obs: Any, info: dict) -> Any:
        if self.numpy_mode is not None:
            mask = env_mask(self.env, info, self.source)[None] if self.source is not None else None
            a = self.to_env(self.numpy_mode(np.asarray(obs)[None], mask)[0])
            return a.item() if a.ndim == 0 else a
        param = next(self.actor.parameters())
        x = torch.as_tensor(np.asarray(obs), dtype=param.dtype, device=param.device)
        if self.obs_normalizer is not None:
            x = self.obs_normalizer.normalize(x)
        with torch.inference_mode():
            if getattr(self.actor, "recurrent", False):  # the state runs through the episode
                dist, self.hidden = self.actor.step(x.unsqueeze(0), self.hidden)
            else:
                dist = self.actor(x.unsqueeze(0))
            if self.source is not None:
                mask = env_mask(self.env, info, self.source)
                dist = mask_logits(dist, torch.as_tensor(mask, device=param.device).unsqueeze(0))
            action = mode(self.actor.family, dist)[0]
        a = self.to_env(action.cpu().numpy())
        # A Discrete action as a Python int: some envs (Taxi) index tables with it.
        return a.item() if a.ndim == 0 else a

    def __call__(self, obs: Any, info: dict, recorder: _Recorder | None) -> tuple[float, bool]:
        if recorder is not None:
            recorder.grab()
        total, steps = 0.0, 0
        while True:
            obs, reward, terminated, truncated, info = self.env.step(self.action(obs, info))
            steps += 1
            _check_finite(self.env_id, self.index, steps, obs, reward)
            total += float(reward)
            if recorder is not None:
                recorder.grab()
            if terminated or truncated:
                return total, False
            if steps >= self.cap:
                return total, True


def load_policy(
    run_dir: str | Path, *, allow_import: bool = False, actor: torch.nn.Module | None = None
) -> tuple[Actor | ModuleActor, RunningMeanStd | None, str]:
    """The actor, frozen observation statistics and env id of a run's newest valid checkpoint
    that fits the run's env and network (others are skipped with a warning on stderr).

    Args:
        run_dir: a run directory written by ``python -m trpo.run``.
        allow_import: resolve a ``"module:Env-v0"`` id of the run's ``config.json`` by
            importing ``module``, and its ``actor_factory`` likewise. Off by default: a run
            directory may come from someone else, and importing a module runs its code.
        actor: for a run trained with ``train(config, actor=module)`` and no
            ``actor_factory``: a module of the same architecture (its weights are replaced).

    Raises:
        RunDirError: ``config.json`` is a link, a FIFO or another non-regular file.
        ValueError: the run's config is missing or invalid, or its env id names a module
            and ``allow_import`` is False, or the env cannot be created.
        CheckpointError: no checkpoint is valid and fits (the message lists each and why).
    """
    # config.json must be a regular file: never block on a FIFO or follow a link there.
    with contextlib.suppress(FileNotFoundError):  # load_config names a missing one
        read_regular_file(Path(run_dir) / CONFIG_FILENAME, max_bytes=_MAX_CONFIG_BYTES)
    config = load_config(run_dir)
    imports = {"env": env_module(config.env_id)}
    if actor is None and config.actor_factory is not None:
        imports["actor_factory"] = config.actor_factory.partition(":")[0]
    for what, module in imports.items():
        if module is not None and not allow_import:
            raise ValueError(
                f"{Path(run_dir) / 'config.json'} names {what} "
                f"{getattr(config, what, config.env_id)!r}, which would import the Python "
                f"module {module!r} and run its code; if you trust this run directory, pass "
                "--allow-import (allow_import=True)"
            )
    env = make_env(config.env_id)
    try:
        policy = build_actor(config, env.observation_space, env.action_space, actor)
        obs_shape = tuple(env.observation_space.shape)
    finally:
        env.close()
    policy = policy.to(dtype=config.torch_dtype())
    loaded = load_latest_checkpoint(
        run_dir,
        validate=lambda state: (
            # Only the actor is loaded: a critic that was a module does not matter here.
            check_user_modules(state, ("critic",) if actor is None else ("actor", "critic")),
            check_state_shapes(state, actor=policy),
        ),
    )
    for path, reason in loaded.skipped:
        print(f"warning: skipped checkpoint {path}: {reason}", file=sys.stderr)
    state = loaded.state
    policy.load_state_dict(state["actor"])
    obs_rms = None
    if "obs_rms" in state:
        pixels = pixel_mask(env.observation_space)
        obs_rms = RunningMeanStd(obs_shape, clip=config.obs_clip, raw=pixels)
        obs_rms.load_state_dict(state["obs_rms"])
        obs_rms.frozen = True
    return policy, obs_rms, config.env_id
