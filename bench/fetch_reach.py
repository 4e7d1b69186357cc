"""Dict observations: this project's TRPO vs sb3-contrib's ``TRPO("MultiInputPolicy")`` on
FetchReachDense (gymnasium-robotics), same settings and seeds; success rate of the final policy.

Ours flattens the Dict observation (``observation``, ``achieved_goal``, ``desired_goal``) with
``FlattenObservation`` into one vector for its MLP (:mod:`trpo.envs`); SB3's
``MultiInputPolicy`` flattens each key and concatenates them (``CombinedExtractor``): the same
16 features, in the same (sorted-key) order. Both sides get the same total steps, ``n_envs``,
``n_steps``, γ, λ, ``max_kl`` (SB3 ``target_kl``), CG settings, critic settings and 64-64 tanh
networks, no observation or reward normalisation.

Each final policy plays ``--episodes`` deterministic episodes of the gymnasium env (episode
``i`` reset with seed ``10_000 + i``, the same for every policy); the success of an episode is
``info["is_success"]`` at its last step. Ours is loaded from its run directory with
:func:`trpo.evaluation.load_policy` (the newest checkpoint). A ``random`` row (uniform
actions) shows the floor. Prints a markdown table: one row per side and seed, then the mean
per side.

Usage (the table of docs/policies.md)::

    pip install gymnasium-robotics
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/fetch_reach.py --steps 100000 --seeds 1 2 3

Compatibility: gymnasium-robotics 1.4.2 asserts ``joint_type in (mjJNT_HINGE, mjJNT_SLIDE)``,
which is False under mujoco 4 (its enums no longer compare equal to numpy ints from the
left), so every Fetch env fails in ``reset``; :func:`patch_robotics` rewrites those asserts
to compare ``int(joint_type)`` (a no-op on versions without them). Importing this module
applies it, so the CLI can train through it (``module:Env-v0`` ids import the module)::

    PYTHONPATH=bench python -m trpo.run --env fetch_reach:FetchReachDense-v4
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

ENV_ID = "FetchReachDense-v4"
EVAL_SEED = 10_000


def patch_robotics() -> None:
    """Import gymnasium-robotics (registering its envs) and fix its mujoco-4 joint asserts."""
    import gymnasium_robotics.utils.mujoco_utils as mu

    old = "assert joint_type in ("
    src = inspect.getsource(mu)
    if old in src:
        code = compile(src.replace(old, "assert int(joint_type) in ("), mu.__file__, "exec")
        exec(code, mu.__dict__)  # redefines the module's functions in place


patch_robotics()  # at import: see the module docstring


def evaluate(act: Callable[[dict], np.ndarray], episodes: int) -> tuple[float, float]:
    """(success rate, mean return) of ``episodes`` episodes of ``act`` on the Dict env."""
    env = gym.make(ENV_ID)
    successes, returns = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED + i)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, info = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        successes.append(float(info["is_success"]))
        returns.append(total)
    env.close()
    return float(np.mean(successes)), float(np.mean(returns))


def run_ours(args: argparse.Namespace, seed: int) -> Callable[[dict], np.ndarray]:
    from trpo.config import TRPOConfig
    from trpo.evaluation import load_policy
    from trpo.policy import mode
    from trpo.rollout import env_action_converter
    from trpo.train import train

    config = TRPOConfig(
        env_id=f"gymnasium_robotics:{ENV_ID}",
        total_steps=args.steps, seed=seed, n_envs=args.n_envs, n_steps=args.n_steps,
        gamma=args.gamma, gae_lambda=args.gae_lambda, max_kl=args.max_kl,
        hidden_sizes=(args.width, args.width), eval_episodes=0, runs_root=args.runs_root,
        tensorboard=False, plot=False, progress=False, torch_threads=1,
    )
    run_dir = train(config).run_dir
    actor, obs_rms, _ = load_policy(run_dir, allow_import=True)
    space = gym.make(ENV_ID).observation_space  # the Dict space FlattenObservation flattens
    to_env = env_action_converter(gym.make(ENV_ID).action_space)

    def act(obs: dict) -> np.ndarray:
        x = torch.as_tensor(gym.spaces.flatten(space, obs), dtype=torch.float32)
        if obs_rms is not None:
            x = obs_rms.normalize(x)
        with torch.inference_mode():
            return to_env(mode(actor.family, actor(x.unsqueeze(0)))[0].numpy())

    return act


def run_sb3(args: argparse.Namespace, seed: int) -> Callable[[dict], np.ndarray]:
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    model = TRPO(
        "MultiInputPolicy", make_vec_env(ENV_ID, n_envs=args.n_envs, seed=seed),
        n_steps=args.n_steps, batch_size=128, gamma=args.gamma, gae_lambda=args.gae_lambda,
        target_kl=args.max_kl, learning_rate=1e-3, n_critic_updates=10, cg_max_steps=15,
        cg_damping=0.1, seed=seed, device="cpu",
        policy_kwargs=dict(net_arch=dict(pi=[args.width] * 2, vf=[args.width] * 2)),
    )
    model.learn(total_timesteps=args.steps)
    return lambda obs: model.predict(obs, deterministic=True)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="training env steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sides", nargs="+", default=["ours", "sb3"], choices=["ours", "sb3"])
    p.add_argument("--n-envs", type=int, default=2)
    p.add_argument("--n-steps", type=int, default=512, help="steps per env per update")
    p.add_argument("--gamma", type=float, default=0.98)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--max-kl", type=float, default=0.01, help="ours max_kl = SB3 target_kl")
    p.add_argument("--width", type=int, default=64, help="hidden width (two layers, tanh)")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes per policy")
    p.add_argument("--runs-root", default=tempfile.mkdtemp(prefix="fetch_reach_"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    rows: list[tuple[str, Any, float, float]] = []
    space = gym.make(ENV_ID).action_space
    space.seed(0)
    rows.append(("random", "-", *evaluate(lambda _obs: space.sample(), args.episodes)))
    print(f"random: success {rows[-1][2]:.2f}, return {rows[-1][3]:.2f}", flush=True)
    runners = {"ours": run_ours, "sb3": run_sb3}
    for seed in args.seeds:
        for side in args.sides:
            rows.append((side, seed, *evaluate(runners[side](args, seed), args.episodes)))
            print(f"{side} seed {seed}: success {rows[-1][2]:.2f}, return {rows[-1][3]:.2f}",
                  flush=True)

    print(f"\n{ENV_ID}, {args.steps} steps, {args.episodes} deterministic eval episodes\n")
    print("| side | seed | success rate | mean return |\n|---|---|---|---|")
    for side, seed, success, ret in rows:
        print(f"| {side} | {seed} | {success:.2f} | {ret:.2f} |")
    for side in args.sides:
        s = [r[2] for r in rows if r[0] == side]
        g = [r[3] for r in rows if r[0] == side]
        sd = statistics.stdev(s) if len(s) > 1 else 0.0
        print(f"| **{side} mean** | {len(s)} seeds | {np.mean(s):.2f} ± {sd:.2f} | "
              f"{np.mean(g):.2f} |")


if __name__ == "__main__":
    main()
