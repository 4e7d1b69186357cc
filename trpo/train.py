"""The TRPO training loop: rollout → GAE → trust-region policy step → critic fit → log.

``train(config)`` is the library entry point (``python -m trpo.run`` is a thin CLI on top).
Everything a run needs to continue lives in its checkpoints, written atomically every
``checkpoint_every`` updates: networks, critic optimiser, normaliser statistics, RNG
states, the step counter. Episodes in progress when a run stops are not saved: a resumed
run resets its envs (with a seed derived from the seed and the update index) and starts
fresh episodes.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from natgrad.trust_region import StepStatus
from trpo.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    load_latest_checkpoint,
    restore_rng_state,
    save_run_checkpoint,
)
from trpo.config import TRPOConfig, check_env_id, check_memory, load_config, save_config
from trpo.distributed import SINGLE_PROCESS, DataParallel, NullLogger
from trpo.gae import compute_gae, normalize_advantages
from trpo.logger import MetricsLogger, ProgressBar, plot_learning_curve, read_metrics
from trpo.normalize import RewardScaler, RunningMeanStd
from trpo.policy import Actor, Critic, make_actor, make_critic, observation_dim
from trpo.rollout import collect_rollout, init_rollout_state, make_envs
from trpo.update import (
    CriticFitResult,
    PolicyBatch,
    explained_variance,
    fit_critic,
    policy_step,
)

__all__ = ["TrainResult", "TrainingError", "train"]


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite updates, a failing env); the last good state is saved."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        actor: The trained policy (evaluate with ``trpo.evaluate.evaluate_policy``).
        critic: The trained value function.
        obs_normalizer: Observation statistics the actor expects (frozen), or None.
        config: The resolved config (run name filled in).
        run_dir: Directory holding ``config.json``, ``metrics.csv``, checkpoints, the PNG.
        metrics: The metrics CSV as columns (``read_metrics``).
        eval_returns: Returns of the final deterministic evaluation episodes.
        global_step: Environment steps taken.
    """

    actor: Actor
    critic: Critic
    obs_normalizer: RunningMeanStd | None
    config: TRPOConfig
    run_dir: Path
    metrics: dict[str, list[Any]]
    eval_returns: list[float]
    global_step: int

    @property
    def eval_mean(self) -> float:
        """Mean return of the final evaluation (NaN when it was skipped)."""
        return float(np.mean(self.eval_returns)) if self.eval_returns else math.nan


def _env_reset_seed(config: TRPOConfig, update: int) -> int:
    # Fresh episodes after a resume must not replay the episodes of update 0.
    return config.seed + 7919 * update


def _dist_param_dim(action_space: gym.Space) -> int:
    """Distribution parameters per state (``check_memory``'s ``act_dim``): K logits for
    Discrete(K), Σ K_i for MultiDiscrete, the flat size for Box / MultiBinary."""
    if isinstance(action_space, gym.spaces.Discrete):
        return int(action_space.n)
    if isinstance(action_space, gym.spaces.MultiDiscrete):
        return int(np.sum(action_space.nvec))
    return int(np.prod(action_space.shape)) if action_space.shape else 1


def _is_finite_module(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _print(message: str, bar: ProgressBar | None) -> None:
    if bar is not None and bar.enabled:
        bar.write(message)
    else:
        print(message, flush=True)


def _resume_config(config: TRPOConfig, *, merge_saved: bool) -> TRPOConfig:
    """The config of a resumed run: its saved config.json, overridden by the fields of
    ``config`` that differ from the TRPOConfig defaults (``merge_saved``), else ``config``."""
    base = load_config(config.resume)
    if merge_saved:
        defaults = TRPOConfig()
        overrides = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in ("resume", "run_name")
            and getattr(config, f.name) != getattr(defaults, f.name)
        }
        config = dataclasses.replace(base, **overrides, resume=config.resume)
    if config.env_id != base.env_id:
        raise ValueError(
            f"env_id is {config.env_id!r} but the run in {config.resume} trains {base.env_id!r}; "
            f"a resumed run keeps its env"
        )
    return dataclasses.replace(config, run_name=Path(config.resume).name)


def train(config: TRPOConfig, *, merge_saved: bool = True) -> TrainResult:
    """Train a TRPO agent as configured; returns the policy, the metrics and the run directory.

    With ``config.resume`` set to a run directory, continues that run from its newest valid
    checkpoint (step counter, networks, optimiser, normalisers, RNG states). Its saved
    ``config.json`` is the base and the fields of ``config`` that differ from the
    :class:`TRPOConfig` defaults override it, so ``train(TRPOConfig(resume=d,
    total_steps=2_000_000))`` continues ``d`` with its own hyperparameters and a larger budget
    (``merge_saved=False``: use ``config`` exactly as given, as the CLI does after merging).

    Started by ``torchrun`` (``WORLD_SIZE > 1``), every process trains data parallel on its own
    envs and rank 0 writes the run (``trpo.distributed``, docs/distributed.md).

    Raises:
        ValueError: Invalid config, unknown env id, or a batch that would not fit in memory
            (all before any env is created).
        TrainingError: ``max_consecutive_failures`` updates in a row were non-finite, or an env
            produced a non-finite observation/reward or raised (the checkpoint of the last
            completed update is kept).
    """
    if config.resume is not None:
        config = _resume_config(config, merge_saved=merge_saved)
    config = config.resolved()
    check_env_id(config.env_id)
    # The exact memory estimate needs the spaces, known only once an env exists; with the
    # smallest spaces (1, 1) it is a lower bound, so a hopeless batch is refused before any
    # env is created. _train repeats it with the real sizes before allocating anything.
    check_memory(config, 1, 1)

    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    device, dtype = config.torch_device(), config.torch_dtype()

    # Under torchrun (WORLD_SIZE > 1): join the process group; rank 0's config (its run
    # name holds a timestamp) for all. A failed collective (a rank died or hung) becomes a
    # TrainingError naming the run to resume. See docs/distributed.md.
    dp = DataParallel.from_env(device)
    try:
        config, device = dp.broadcast(config), dp.device(device)
        envs = make_envs(config.env_id, config.n_envs, async_=config.async_envs)
        try:
            return _train(config, envs, device, dtype, dp)
        finally:
            envs.close()
    except RuntimeError as e:
        if not dp.enabled or isinstance(e, TrainingError):
            raise
        raise TrainingError(
            f"rank {dp.rank} of {dp.world_size}: {type(e).__name__}: {e}. If another rank "
            "died or hung, see its log; resume from the last checkpoint with --resume "
            f"{config.run_dir}"
        ) from e
    finally:
        dp.close()


def _train(
    config: TRPOConfig,
    envs: Any,
    device: torch.device,
    dtype: torch.dtype,
    dp: DataParallel = SINGLE_PROCESS,
) -> TrainResult:
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    check_memory(config, observation_dim(obs_space), _dist_param_dim(act_space))

    torch.manual_seed(config.seed)
    actor = make_actor(obs_space, act_space, config.hidden_sizes).to(device=device, dtype=dtype)
    critic = make_critic(obs_space, config.hidden_sizes).to(device=device, dtype=dtype)
    if actor.family == "diag_gaussian" and config.log_std_init != 0.0:
        with torch.no_grad():
            actor.log_std.fill_(config.log_std_init)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=config.critic_lr)
    use_cuda_graph = config.cuda_graph and torch.device(device).type == "cuda"
    generator = torch.Generator(device=device).manual_seed(config.seed)
    cpu_generator = torch.Generator().manual_seed(config.seed + 1)
    obs_rms = (
        RunningMeanStd(tuple(obs_space.shape), clip=config.obs_clip)
        if config.normalize_obs
        else None
    )
    reward_scaler = (
        RewardScaler(config.gamma, config.n_envs, clip=config.reward_clip)
        if config.normalize_reward
        else None
    )
    obs_rms, reward_scaler = dp.synced_statistics(obs_rms, reward_scaler)
    # total_steps counts the env steps of all ranks.
    num_updates = dp.num_updates(config.total_steps, config.batch_size)

    run_dir = config.run_dir
    start_update, global_step, failures = 0, 0, 0
    if config.resume is not None:
        loaded = load_latest_checkpoint(run_dir, map_location=device)
        for path, reason in loaded.skipped:
            print(f"warning: skipped checkpoint {path}: {reason}", file=sys.stderr)
        state = loaded.state
        actor.load_state_dict(state["actor"])
        critic.load_state_dict(state["critic"])
        critic_opt.load_state_dict(state["critic_optimizer"])
        if obs_rms is not None:
            obs_rms.load_state_dict(state["obs_rms"])
        if reward_scaler is not None:
            reward_scaler.load_state_dict(state["reward_scaler"])
            # The episodes in progress are not resumed (fresh ones start), so neither are
            # their discounted-return accumulators; the return statistics are.
            reward_scaler.returns[:] = 0.0
        restore_rng_state(state["rng"], torch_generator=generator)
        cpu_generator.set_state(state["rng_cpu"])
        start_update, global_step = int(state["update"]), int(state["global_step"])
        print(f"resumed {run_dir} from {loaded.path.name} at step {global_step}", flush=True)
        if state.get("world_size", 1) != dp.world_size and dp.is_main:
            print(
                f"warning: resuming a run of {state.get('world_size', 1)} rank(s) with "
                f"{dp.world_size}: the batch per update changes",
                file=sys.stderr,
            )
    # Every rank starts from rank 0's parameters (and checks that the rest agrees too).
    dp.broadcast_modules(actor, critic)
    dp.check_agreement(actor, critic, critic_opt, obs_rms, reward_scaler)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dp.is_main:
        save_config(config, run_dir)
    # The state at the start of update u is saved as ckpt_u at most once: an error path
    # that would save the same state again (e.g. right after a resume) leaves the file be.
    last_saved = start_update if config.resume is not None else -1

    def checkpoint(update: int) -> None:
        nonlocal last_saved
        if update == last_saved or not dp.is_main:  # rank 0 alone writes
            return
        state = {
            "actor": actor.state_dict(),
            "critic": critic.state_dict(),
            "critic_optimizer": critic_opt.state_dict(),
            "rng": capture_rng_state(torch_generator=generator),
            "rng_cpu": cpu_generator.get_state(),
            "update": update,
            "global_step": global_step,
            "config": config.to_dict(),
        }
        if obs_rms is not None:
            state["obs_rms"] = obs_rms.state_dict()
        if reward_scaler is not None:
            state["reward_scaler"] = reward_scaler.state_dict()
        if dp.enabled:  # each rank's RNG is derived from (seed, rank, update): nothing to save
            state["world_size"] = dp.world_size
        logger.flush()
        save_run_checkpoint(run_dir, update, state, keep=config.keep_checkpoints)
        last_saved = update

    logger = (
        MetricsLogger(
            run_dir,
            tensorboard=config.tensorboard,
            resume_step=global_step if config.resume is not None else None,
        )
        if dp.is_main
        else NullLogger()
    )
    progress = config.progress and dp.is_main
    bar = ProgressBar(config.total_steps, initial=global_step, enabled=progress)
    recent_returns: collections.deque[float] = collections.deque(maxlen=20)
    text_every = max(1, num_updates // 20)
    rollout_state = init_rollout_state(
        envs, dp.env_seed(_env_reset_seed(config, start_update)), global_step=global_step
    )
    t_start, steps_at_start = time.perf_counter(), global_step
    try:
        for update in range(start_update, num_updates):
            # --- 1. rollout with π_old ----------------------------------------------------
            t0 = time.perf_counter()
            dp.reseed(config.seed, update, generator, cpu_generator)
            noise_state = generator.get_state()
            try:
                rollout = collect_rollout(
                    envs,
                    actor,
                    critic,
                    config.n_steps,
                    state=rollout_state,
                    generator=generator,
                    obs_normalizer=obs_rms,
                    reward_scaler=reward_scaler,
                    dtype=dtype,
                )
            except (ValueError, RuntimeError) as e:
                # A failed rollout changes no saved state (statistics and episode counters
                # are updated only on success) except the action noise drawn: undo that, so
                # the checkpoint is exactly the state after the last completed update.
                generator.set_state(noise_state)
                checkpoint(update)
                raise TrainingError(
                    f"{e}; the checkpoint of the last completed update ({update}) is in "
                    f"{run_dir}; resume with --resume {run_dir}"
                ) from e
            global_step += dp.world_size * rollout.batch_size
            t1 = time.perf_counter()

            # --- 2. advantages by GAE(γ, λ) -----------------------------------------------
            advantages, returns = compute_gae(
                rollout.rewards,
                rollout.values,
                rollout.next_values,
                rollout.terminations,
                rollout.truncations,
                config.gamma,
                config.gae_lambda,
            )
            obs = rollout.obs.reshape(rollout.batch_size, *rollout.obs.shape[2:])
            actions = rollout.actions.reshape(rollout.batch_size, *rollout.actions.shape[2:])
            adv = advantages.reshape(-1)
            if config.normalize_advantages:
                adv = dp.normalize_advantages(adv) if dp.enabled else normalize_advantages(adv)

            # --- 3. trust-region policy step -------------------------------------------------
            # A non-finite iteration must change no parameter: keep all it could touch.
            backup = copy.deepcopy(
                (actor.state_dict(), critic.state_dict(), critic_opt.state_dict())
            )
            step = policy_step(
                actor,
                PolicyBatch(obs=obs, actions=actions, advantages=adv),
                max_kl=config.max_kl,
                cg_iters=config.cg_iters,
                cg_damping=config.cg_damping,
                cg_rtol=config.cg_rtol,
                fvp_fraction=config.fvp_fraction,
                line_search_shrink=config.line_search_shrink,
                line_search_max_tries=config.line_search_max_tries,
                line_search_accept_ratio=config.line_search_accept_ratio,
                generator=cpu_generator,
                distributed=dp.enabled,
                cuda_graph=use_cuda_graph,
            )
            t2 = time.perf_counter()

            # --- 4. critic regression on the GAE returns ----------------------------------
            policy_ok = step.status != StepStatus.NON_FINITE.name
            fit = CriticFitResult(value_loss=math.nan, steps=0)
            if policy_ok:  # a batch that broke the policy step is not fitted either
                fit = fit_critic(
                    critic,
                    critic_opt,
                    obs,
                    returns.reshape(-1),
                    epochs=config.critic_epochs,
                    minibatch_size=config.critic_minibatch_size,
                    generator=cpu_generator,
                    distributed=dp.enabled,
                    cuda_graph=use_cuda_graph,
                )
            update_ok = policy_ok and math.isfinite(fit.value_loss) and _is_finite_module(critic)
            t3 = time.perf_counter()

            # --- 5. failure accounting: a non-finite update is never applied ----------------
            failures = 0 if update_ok else failures + 1
            if not update_ok:
                actor.load_state_dict(backup[0])
                critic.load_state_dict(backup[1])
                critic_opt.load_state_dict(backup[2])
                _print(
                    f"update {update + 1}: non-finite {'critic fit' if policy_ok else 'policy step'}"
                    f" rejected, parameters kept ({failures}/{config.max_consecutive_failures})",
                    bar,
                )
            elif step.status != StepStatus.OK.name:  # degenerate but safe: a logged no-op
                _print(f"update {update + 1}: {StepStatus[step.status].message}", bar)

            # The ranks must still agree (bit for bit); a cheap checksum, fails loudly if not.
            dp.check_agreement(actor, critic, critic_opt, obs_rms, reward_scaler)

            # --- 6. log ---------------------------------------------------------------------
            ep_returns = dp.gather(rollout.episode_returns)  # the episodes of every rank
            ep_lengths = dp.gather(rollout.episode_lengths)
            recent_returns.extend(ep_returns.tolist())
            ep_return = float(ep_returns.mean()) if ep_returns.numel() else None
            elapsed = time.perf_counter() - t_start
            metrics = {
                "charts/episode_return": ep_return,
                "charts/episode_length": float(ep_lengths.double().mean())
                if ep_lengths.numel()
                else None,
                "charts/episodes": ep_returns.numel(),
                "charts/steps_per_second": (global_step - steps_at_start) / max(elapsed, 1e-9),
                "trpo/kl": step.kl,
                "trpo/surrogate_improvement": step.surrogate_improvement,
                "trpo/expected_improvement": step.expected_improvement,
                "trpo/step_fraction": step.step_fraction,
                "trpo/line_search_success": float(step.applied),
                "trpo/line_search_tries": step.line_search_tries,
                "trpo/step_status": step.status,
                "trpo/grad_norm": step.grad_norm,
                "trpo/step_norm": step.step_norm,
                "trpo/entropy": step.entropy,
                "trpo/explained_variance": (
                    dp.explained_variance if dp.enabled else explained_variance
                )(rollout.values.reshape(-1), returns.reshape(-1)),
                "trpo/value_loss": fit.value_loss if policy_ok else None,
                "trpo/nonfinite_update": float(not update_ok),
                "trpo/consecutive_failures": failures,
                "natgrad/cg_iterations": step.cg_iterations,
                "natgrad/cg_residual": step.cg_residual,
                "time/rollout_seconds": t1 - t0,
                "time/policy_step_seconds": t2 - t1,
                "time/critic_seconds": t3 - t2,
                "time/update_seconds": t3 - t1,
            }
            last = update + 1 == num_updates
            if (update + 1) % config.log_every == 0 or last or not update_ok:
                logger.log(
                    global_step, {k: v for k, v in metrics.items() if not isinstance(v, str)}
                )
            recent = float(np.mean(recent_returns)) if recent_returns else None
            bar.update(global_step, episode_return=recent, kl=step.kl)
            if not bar.enabled and progress and (update + 1) % text_every == 0:
                print(
                    f"step {global_step:>9d}/{config.total_steps}  return {recent if recent is not None else float('nan'):8.1f}"
                    f"  kl {step.kl:.4f}  {metrics['charts/steps_per_second']:7.0f} steps/s",
                    flush=True,
                )

            # --- 7. checkpoint (the last good state first, when giving up) --------------------
            if failures >= config.max_consecutive_failures:
                checkpoint(update + 1)
                raise TrainingError(
                    f"{failures} consecutive updates were non-finite and rejected (last: policy "
                    f"step {step.status}, critic loss {fit.value_loss}); the parameters of the "
                    f"last good update are saved in {checkpoint_path(run_dir, update + 1)}. "
                    "Try a smaller max_kl, more cg_damping, normalize_obs/normalize_reward, "
                    "or float64."
                )
            if (update + 1) % config.checkpoint_every == 0 and update + 1 < num_updates:
                checkpoint(update + 1)
        # max: a resume asked for fewer steps than already done trains nothing and must not
        # save the current state under an older update's name.
        checkpoint(max(num_updates, start_update))
    finally:
        bar.close()
        logger.close()

    if config.plot and dp.is_main:
        plot_learning_curve(
            run_dir / "metrics.csv", run_dir / "learning_curve.png", title=config.env_id
        )
    if obs_rms is not None:
        obs_rms.frozen = True
    eval_returns: list[float] = []
    if config.eval_episodes > 0 and dp.is_main:
        # Imported here: `import trpo` must not import trpo.evaluate, or
        # `python -m trpo.evaluate` warns that the module was imported before it ran.
        from trpo.evaluate import evaluate_policy

        eval_returns = evaluate_policy(
            actor,
            config.env_id,
            episodes=config.eval_episodes,
            obs_normalizer=obs_rms,
            seed=config.seed + 10_000,
        )
        print(
            f"evaluation over {len(eval_returns)} episodes: mean return "
            f"{np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f}  (run dir: {run_dir})",
            flush=True,
        )
    return TrainResult(
        actor=actor,
        critic=critic,
        obs_normalizer=obs_rms,
        config=config,
        run_dir=run_dir,
        metrics=read_metrics(run_dir / "metrics.csv") if dp.is_main else {},
        eval_returns=eval_returns,
        global_step=global_step,
    )
