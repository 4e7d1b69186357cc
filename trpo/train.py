"""The TRPO training loop: rollout → GAE → trust-region policy step → critic fit → log.

``train(config)`` is the library entry point (``python -m trpo.run`` is a thin CLI on top).
It sets the run up (or restores it from its newest checkpoint), then runs :func:`_loop`, whose
body is the algorithm, one numbered step per line, and finishes with a plot and an
evaluation.

Everything a run needs to continue lives in its checkpoints, written atomically every
``checkpoint_every`` updates: networks, critic optimiser, normaliser statistics, RNG
states, the step counter. Episodes in progress when a run stops are not saved: a resumed
run resets its envs (with a seed derived from the seed and the update index) and starts
fresh episodes.

What can go wrong is handled where it happens (docs/reliability.md): a non-finite update is
rolled back (:meth:`_State.roll_back`), a failing env or write saves what is complete and
raises :class:`TrainingError`, SIGINT/SIGTERM stop between two updates after a checkpoint
(:mod:`trpo.interrupt`, :class:`TrainingInterrupted`), and a critic diverging towards
overflow is reported once (:mod:`trpo.divergence`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from natgrad.adam import Adam
from natgrad.trust_region import StepStatus
from trpo.checkpoint import (
    capture_rng_state,
    check_state_shapes,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_run_checkpoint,
)
from trpo.config import (
    TRPOConfig,
    check_device,
    check_env_id,
    default_run_name,
    resume_config,
    save_config,
)
from trpo.critic import CriticFitResult, CriticSettings, explained_variance, fit_critic
from trpo.distributed import DataParallel, NullLogger
from trpo.divergence import CriticWatch
from trpo.envpool_env import resolve_env_backend
from trpo.evaluation import evaluate_policy
from trpo.gae import compute_gae, normalize_advantages
from trpo.interrupt import ImmediateInterrupt, StopOnSignal, children_ignore_sigint, signal_name
from trpo.logger import (
    TENSORBOARD_DIRNAME,
    MetricsLogger,
    ProgressBar,
    plot_learning_curve,
    read_metrics,
)
from trpo.masks import check_mask_space
from trpo.memory import check_memory
from trpo.modules import check_user_modules
from trpo.networks import build_actor, build_critic, pixel_mask
from trpo.normalize import RewardScaler, RunningMeanStd
from trpo.policy import Actor, Critic, observation_dim
from trpo.recurrent import sequence_batch
from trpo.rollout import Rollout, RolloutState, collect_rollout, init_rollout_state, make_envs
from trpo.update import PolicyBatch, PolicyStepResult, PolicyStepSettings, policy_step

__all__ = ["TrainResult", "TrainingError", "TrainingInterrupted", "train"]


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite updates, a failing env); the last good state is saved."""


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM stopped the run; the checkpoint of the last completed update is saved.

    Attributes:
        run_dir: The run directory (continue with ``--resume run_dir``).
        signum: The signal received (the CLI exits with ``128 + signum``).
    """

    def __init__(self, message: str, *, run_dir: Path, signum: int) -> None:
        super().__init__(message)
        self.run_dir, self.signum = run_dir, signum


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        actor: The trained policy (evaluate with ``trpo.evaluation.evaluate_policy``).
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


@dataclass
class _State:
    """Everything an update changes and a checkpoint saves."""

    actor: Actor
    critic: Critic
    critic_opt: Adam  # torch.optim.Adam's arithmetic and checkpoint format, no dynamo import
    generator: torch.Generator  # action noise, on the device
    cpu_generator: torch.Generator  # Fisher subsample and critic minibatches
    obs_rms: RunningMeanStd | None
    reward_scaler: RewardScaler | None
    user_modules: tuple[str, ...] = ()  # networks passed to train() as modules, no factory
    update: int = 0  # updates done
    global_step: int = 0  # env steps done, summed over ranks

    def shared(self) -> tuple[Any, ...]:
        """What every rank must hold identically (:meth:`DataParallel.check_agreement`)."""
        return self.actor, self.critic, self.critic_opt, self.obs_rms, self.reward_scaler

    def snapshot(self) -> tuple[dict[str, Any], ...]:
        """Copies of everything an update could touch (:meth:`roll_back` restores them)."""
        modules = (self.actor, self.critic, self.critic_opt)
        return copy.deepcopy(tuple(m.state_dict() for m in modules))

    def roll_back(self, snapshot: tuple[dict[str, Any], ...]) -> None:
        for module, saved in zip((self.actor, self.critic, self.critic_opt), snapshot):
            module.load_state_dict(saved)


class _Update(NamedTuple):
    step: PolicyStepResult
    fit: CriticFitResult
    policy_seconds: float
    critic_seconds: float

    @property
    def policy_ok(self) -> bool:
        return self.step.status != StepStatus.NON_FINITE.name


# ------------------------------------------------------------------------------------ set-up
def train(
    config: TRPOConfig, *, actor: torch.nn.Module | None = None, critic: torch.nn.Module | None = None
) -> TrainResult:
    """Train a TRPO agent as configured; returns the policy, the metrics and the run directory.

    ``actor`` / ``critic``: your own ``nn.Module``s instead of the built-in networks (the
    protocol: :mod:`trpo.modules`, docs/policies.md); they are trained in place, and
    ``result.actor.net`` is yours. To resume or evaluate such a run, pass modules of the same
    architecture again, or name their constructors in ``actor_factory`` / ``critic_factory``.

    A new run creates its directory ``runs_root/run_name`` exclusively (a ``run_name`` that
    exists is refused; a default name that is taken gets a suffix). With ``config.resume``
    set to a run directory, continues that run from its newest valid checkpoint (step
    counter, networks, optimiser, normalisers, RNG states) under its saved ``config.json``,
    overridden by the fields the caller gave (:func:`trpo.config.resume_config`): so
    ``train(TRPOConfig(resume=d, total_steps=2_000_000))`` continues ``d`` with its own
    hyperparameters and a larger budget.

    Started by ``torchrun`` (``WORLD_SIZE > 1``), every process trains data parallel on its own
    envs and rank 0 writes the run (``trpo.distributed``, docs/distributed.md).

    SIGINT (Ctrl-C) or SIGTERM finishes the current update, saves its checkpoint and raises
    :class:`TrainingInterrupted`; a second one stops at once (:mod:`trpo.interrupt`). The
    previous signal handlers are restored when ``train`` returns or raises.

    Raises:
        ValueError: Invalid config, unknown env id, a device this machine lacks, a batch that
            would not fit in memory (all before any env is created), a run directory that
            exists or cannot be created or written, or a resume that changes a field the
            checkpoint fixes.
        TrainingError: ``max_consecutive_failures`` updates in a row were non-finite, or an env
            could not be created, raised in ``reset`` or ``step`` or produced a non-finite
            observation/reward (the checkpoint of the last completed update is kept).
        TrainingInterrupted: (a ``TrainingError``) SIGINT/SIGTERM; the state is saved.
        trpo.interrupt.ImmediateInterrupt: (a ``KeyboardInterrupt``) a second signal.
    """
    if config.resume is not None:
        config = resume_config(config)
    check_env_id(config.env_id)
    config = _resolve_backend(config)
    check_device(config.device)
    # The exact memory estimate needs the spaces, known only once an env exists; with the
    # smallest spaces (1, 1) it is a lower bound, so a hopeless batch is refused before any
    # env is created. It is repeated with the real sizes before anything is allocated.
    check_memory(config, 1, 1)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    # Under torchrun (WORLD_SIZE > 1): join the process group. A failed collective (a rank
    # died or hung) becomes a TrainingError naming the run to resume. See docs/distributed.md.
    dp = DataParallel.from_env(config.torch_device())
    try:
        device = dp.device(config.torch_device())
        envs = _make_envs(config)
        try:
            obs_space, act_space = envs.single_observation_space, envs.single_action_space
            check_memory(config, observation_dim(obs_space), _dist_param_dim(act_space))
            config = _agree_on_run_dir(config, dp)
            return _train(config, envs, device, dp, (actor, critic))
        finally:
            _close_envs(envs)
    except RuntimeError as e:
        if not dp.enabled or isinstance(e, TrainingError):
            raise
        where = config.resume or Path(config.runs_root) / str(config.run_name)
        raise TrainingError(
            f"rank {dp.rank} of {dp.world_size}: {type(e).__name__}: {e}. If another rank "
            f"died or hung, see its log; resume from the last checkpoint with --resume {where}"
        ) from e
    finally:
        dp.close()


def _create_run_dir(config: TRPOConfig) -> TRPOConfig:
    """Create the directory of a new run with ``os.mkdir`` (atomic and exclusive: two runs
    never share one) and return the config naming it.

    A default name that is taken (a run of the same env and seed started in the same second)
    gets the first free suffix ``-2``, ``-3``, ...; a ``run_name`` the caller chose that
    exists is refused, since writing into it would mix two runs.

    Raises:
        ValueError: the chosen directory exists, or ``runs_root`` cannot be written.
    """
    root = Path(config.runs_root)
    base = config.run_name or default_run_name(config.env_id, config.seed)
    name, suffix = base, 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                os.mkdir(root / name)
                return dataclasses.replace(config, run_name=name)
            except FileExistsError:
                if config.run_name is not None:
                    raise ValueError(
                        f"run directory {root / name} already exists: continue that run with "
                        f"--resume {root / name} (resume= in Python), or choose a fresh "
                        "--run-name"
                    ) from None
                suffix += 1
                name = f"{base}-{suffix}"
    except OSError as e:
        raise ValueError(f"cannot create a run directory in {root}: {e}") from None


def _check_run_dir_writable(run_dir: Path) -> None:
    """Before a resumed run trains anything: everything it will write to must be writable
    (the directory, ``checkpoints/``, ``metrics.csv``, ``tensorboard/``), or one update
    would be trained and then lost when its results cannot be saved.

    Raises:
        ValueError: naming the first path that cannot be written.
    """
    for name, need in (
        ("", os.W_OK | os.X_OK),
        ("checkpoints", os.W_OK | os.X_OK),
        ("metrics.csv", os.W_OK),
        (TENSORBOARD_DIRNAME, os.W_OK | os.X_OK),
    ):
        path = run_dir / name
        if (name == "" or os.path.lexists(path)) and not os.access(path, need):
            raise ValueError(
                f"cannot resume {run_dir}: {path} is not writable, so this run's checkpoints "
                f"and metrics could not be saved; make it writable (chmod -R u+w {run_dir}) "
                "or copy the run directory somewhere writable and resume the copy"
            )


def _agree_on_run_dir(config: TRPOConfig, dp: DataParallel) -> TRPOConfig:
    """Rank 0 creates a new run's directory (or checks that a resumed one is writable);
    every rank gets rank 0's config (its run name may hold a timestamp and a suffix), or
    rank 0's error, so that no rank waits for it."""
    outcome: TRPOConfig | ValueError = config
    if dp.is_main:
        try:
            if config.resume is None:
                outcome = _create_run_dir(config)
            else:
                _check_run_dir_writable(config.run_dir)
        except ValueError as e:
            outcome = e
    outcome = dp.broadcast(outcome)
    if isinstance(outcome, ValueError):
        raise outcome
    return outcome


def _build(
    config: TRPOConfig, envs: Any, device: torch.device, dp: DataParallel, modules: tuple
) -> _State:
    """Fresh networks (or the user's ``modules`` = (actor, critic), each possibly None), critic
    optimiser, generators and normalisers, seeded by ``config.seed``."""
    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    check_mask_space(config.action_masks, act_space)
    dtype = config.torch_dtype()
    torch.manual_seed(config.seed)
    actor = build_actor(config, obs_space, act_space, modules[0]).to(device=device, dtype=dtype)
    critic = build_critic(config, obs_space, act_space, modules[1]).to(device=device, dtype=dtype)
    if getattr(actor, "log_std", None) is not None and config.log_std_init != 0.0:
        with torch.no_grad():
            actor.log_std.fill_(config.log_std_init)
    obs_rms = (
        RunningMeanStd(tuple(obs_space.shape), clip=config.obs_clip, raw=pixel_mask(obs_space))
        if config.normalize_obs
        else None
    )
    reward_scaler = (
        RewardScaler(config.gamma, config.n_envs, clip=config.reward_clip)
        if config.normalize_reward
        else None
    )
    obs_rms, reward_scaler = dp.synced_statistics(obs_rms, reward_scaler)
    return _State(
        actor=actor,
        critic=critic,
        critic_opt=Adam(critic.parameters(), lr=config.critic_lr),
        generator=torch.Generator(device=device).manual_seed(config.seed),
        cpu_generator=torch.Generator().manual_seed(config.seed + 1),
        obs_rms=obs_rms,
        reward_scaler=reward_scaler,
        user_modules=tuple(
            name
            for name, module in zip(("actor", "critic"), modules)
            if module is not None and getattr(config, f"{name}_factory") is None
        ),
    )


def _restore(state: _State, config: TRPOConfig, device: torch.device, dp: DataParallel) -> None:
    """Load the newest valid checkpoint of ``config.run_dir`` into ``state``."""
    # A checkpoint that does not fit these networks (another env's) is skipped like a damaged
    # one, so the newest one that does is restored.
    loaded = load_latest_checkpoint(
        config.run_dir,
        map_location=device,
        validate=lambda saved: (
            check_user_modules(saved, state.user_modules),
            check_state_shapes(saved, actor=state.actor, critic=state.critic),
        ),
    )
    for path, reason in loaded.skipped:
        print(f"warning: skipped checkpoint {path}: {reason}", file=sys.stderr)
    saved = loaded.state
    state.actor.load_state_dict(saved["actor"])
    state.critic.load_state_dict(saved["critic"])
    state.critic_opt.load_state_dict(saved["critic_optimizer"])
    for group in state.critic_opt.param_groups:  # the optimiser's state_dict holds the old lr
        group["lr"] = config.critic_lr
    if state.obs_rms is not None:
        state.obs_rms.load_state_dict(saved["obs_rms"])
    if state.reward_scaler is not None:
        # The episodes in progress are not resumed (fresh ones start), so neither are their
        # discounted-return accumulators, one per env (n_envs may change); the statistics are.
        returns = torch.zeros(config.n_envs, dtype=torch.float64)
        state.reward_scaler.load_state_dict({**saved["reward_scaler"], "returns": returns})
    restore_rng_state(saved["rng"], torch_generator=state.generator)
    state.cpu_generator.set_state(saved["rng_cpu"])
    state.update, state.global_step = int(saved["update"]), int(saved["global_step"])
    print(
        f"resumed {config.run_dir} from {loaded.path.name} at step {state.global_step}",
        flush=True,
    )
    if saved.get("world_size", 1) != dp.world_size and dp.is_main:
        print(
            f"warning: resuming a run of {saved.get('world_size', 1)} rank(s) with "
            f"{dp.world_size}: the batch per update changes",
            file=sys.stderr,
        )


def _train(
    config: TRPOConfig, envs: Any, device: torch.device, dp: DataParallel, modules: tuple
) -> TrainResult:
    state = _build(config, envs, device, dp, modules)
    if config.resume is not None:
        _restore(state, config, device, dp)
    # Every rank starts from rank 0's parameters (and checks that the rest agrees too).
    dp.broadcast_modules(state.actor, state.critic)
    dp.check_agreement(*state.shared())
    if dp.is_main:
        save_config(config, config.run_dir)
        extra = ""
        if config.env_backend == "envpool":
            extra += f", {config.env_threads or 'default'} threads"
        if config.async_envs:
            extra += ", async"
        print(f"env backend: {config.env_backend} ({config.n_envs} envs{extra})", flush=True)
    num_updates = dp.num_updates(config.total_steps, config.batch_size)  # all ranks' steps
    reporter = _Reporter(config, dp, num_updates, state.global_step)
    # An error path that would save the state just restored again leaves its file be.
    checkpoints = _Checkpoints(config, dp, reporter, state.update if config.resume else -1)
    try:
        with StopOnSignal() as stop:
            _loop(config, envs, state, dp, num_updates, reporter, checkpoints, stop)
            # A resume that asked for fewer steps than done trained nothing: state.update is
            # the restored one, so no older update's name is written over.
            checkpoints.save(state)
            _stop_if_requested(stop, config, state, dp, checkpoints)
    finally:
        reporter.close()
    return _finish(config, state, dp)


def _stop_if_requested(
    stop: StopOnSignal,
    config: TRPOConfig,
    state: _State,
    dp: DataParallel,
    checkpoints: _Checkpoints,
) -> None:
    """Between updates: after a SIGINT/SIGTERM (on any rank), save the state of the last
    completed update and raise :class:`TrainingInterrupted`."""
    if not dp.reducer.all(not stop.requested):  # every rank stops at the same update
        checkpoints.save(state)
        raise _interrupted(config, state, stop.signum)


def _interrupted(config: TRPOConfig, state: _State, signum: int | None) -> TrainingInterrupted:
    signum = signal.SIGINT if signum is None else signum  # another rank got the signal
    run_dir = config.run_dir
    return TrainingInterrupted(
        f"{signal_name(signum)}: stopped after update {state.update} (step "
        f"{state.global_step}), saved in {checkpoint_path(run_dir, state.update)}; "
        f"resume with: python -m trpo.run --resume {run_dir}",
        run_dir=run_dir,
        signum=int(signum),
    )


# -------------------------------------------------------------------------------- the loop
def _loop(
    config: TRPOConfig,
    envs: Any,
    state: _State,
    dp: DataParallel,
    num_updates: int,
    reporter: _Reporter,
    checkpoints: _Checkpoints,
    stop: StopOnSignal,
) -> None:
    """Updates ``state.update, ..., num_updates − 1``, each: rollout → GAE → policy step →
    critic fit → log → checkpoint; a SIGINT/SIGTERM stops it between two updates."""
    rollout_state = _reset_envs(envs, config, state, dp)
    failures = 0
    critic_watch = CriticWatch(config.gamma, config.critic_lr)
    for update in range(state.update, num_updates):
        _stop_if_requested(stop, config, state, dp, checkpoints)
        # 1. rollout with π_old
        t0 = time.perf_counter()
        dp.reseed(config.seed, update, state.generator, state.cpu_generator)
        rollout = _collect(envs, config, state, rollout_state, checkpoints, stop)
        state.global_step += dp.world_size * rollout.batch_size
        rollout_seconds = time.perf_counter() - t0
        # 2. advantages by GAE(γ, λ)
        batch, returns = _advantages(config, rollout, dp)
        # 3-4. trust-region policy step, critic regression on the GAE returns
        backup = state.snapshot()
        result = _update(config, state, batch, returns, dp)
        ok = result.policy_ok and math.isfinite(result.fit.value_loss)
        ok = ok and _is_finite_module(state.critic)
        failures = 0 if ok else failures + 1
        if not ok:  # a non-finite update is never applied
            state.roll_back(backup)
        state.update = update + 1
        reporter.announce(state.update, result, ok, failures)
        # A critic far beyond any return the rewards allow is diverging: say so (once).
        warning = critic_watch.observe(rollout, result.fit.value_loss)
        if warning is not None and dp.is_main:
            reporter.say(f"warning: update {state.update}: {warning}")
        # The ranks must still agree (bit for bit); a cheap checksum, fails loudly if not.
        dp.check_agreement(*state.shared())
        # 5. log
        reporter.log(state, rollout, returns, result, ok, failures, rollout_seconds)
        # 6. checkpoint (the last good state first, when giving up)
        if failures >= config.max_consecutive_failures:
            checkpoints.save(state)
            raise TrainingError(
                f"{failures} consecutive updates were non-finite and rejected (last: policy "
                f"step {result.step.status}, critic loss {result.fit.value_loss}); the "
                "parameters of the last good update are saved in "
                f"{checkpoint_path(config.run_dir, state.update)}. Try a smaller max_kl, more "
                "cg_damping, normalize_obs/normalize_reward, or float64."
            )
        if state.update % config.checkpoint_every == 0 and state.update < num_updates:
            checkpoints.save(state)


def _make_envs(config: TRPOConfig) -> Any:
    """The vector env of ``config``; an env whose constructor raises is a TrainingError.

    Raises:
        ValueError: an env id gymnasium does not know.
        TrainingError: the env's constructor raised (naming the env id and the error).
    """
    try:
        # Subprocess envs must not die of a terminal's Ctrl-C: the run stops on it itself.
        with children_ignore_sigint(config.async_envs):
            return make_envs(
                config.env_id,
                config.n_envs,
                async_=config.async_envs,
                backend=config.env_backend,
                num_threads=config.env_threads,
            )
    except ValueError:
        raise
    except Exception as e:
        raise TrainingError(
            f"env {config.env_id!r} could not be created: {type(e).__name__}: {e}"
        ) from e


def _close_envs(envs: Any) -> None:
    """Close the envs; a failure (e.g. subprocess envs that died) is a warning, so that it
    never hides the error or the result of the run."""
    try:
        envs.close()
    except Exception as e:
        print(f"warning: closing the envs failed: {type(e).__name__}: {e}", file=sys.stderr)


def _reset_envs(envs: Any, config: TRPOConfig, state: _State, dp: DataParallel) -> RolloutState:
    """Reset the envs for update ``state.update`` (seed derived from it) and start the rollout.

    Raises:
        TrainingError: the env raised in ``reset`` or returned a non-finite observation
            (naming the env id and the error); nothing of the run has changed.
    """
    reset_seed = dp.env_seed(_env_reset_seed(config, state.update))
    try:
        return init_rollout_state(
            envs, reset_seed, global_step=state.global_step, action_masks=config.action_masks
        )
    except Exception as e:
        where = (
            f"the run in {config.run_dir} is unchanged at update {state.update}; resume it "
            f"with --resume {config.run_dir} once the env is fixed"
            if config.resume is not None
            else "no update was trained"
        )
        what = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise TrainingError(
            f"env {config.env_id!r} failed in reset (seed {reset_seed}): {what}; {where}"
        ) from e


def _collect(
    envs: Any,
    config: TRPOConfig,
    state: _State,
    rollout_state: RolloutState,
    checkpoints: _Checkpoints,
    stop: StopOnSignal,
) -> Rollout:
    """Step 1: ``n_steps`` steps of every env with the current policy π_old.

    Raises:
        TrainingError: the env failed (raised, or gave a non-finite observation or reward);
            the state after the last completed update is checkpointed first.
        TrainingInterrupted: the env failed after a SIGINT/SIGTERM (subprocess envs get
            Ctrl-C too): the rollout is abandoned, the last completed update saved.
    """
    noise_state = state.generator.get_state()
    try:
        return collect_rollout(
            envs,
            state.actor,
            state.critic,
            config.n_steps,
            state=rollout_state,
            generator=state.generator,
            obs_normalizer=state.obs_rms,
            reward_scaler=state.reward_scaler,
            dtype=config.torch_dtype(),
        )
    except ImmediateInterrupt:
        raise
    except (ValueError, RuntimeError, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt) and not stop.requested:
            raise
        # A failed rollout changes no saved state (statistics and episode counters are
        # updated only on success) except the action noise drawn: undo that, so the
        # checkpoint is exactly the state after the last completed update.
        state.generator.set_state(noise_state)
        checkpoints.save(state)
        if stop.requested:
            raise _interrupted(config, state, stop.signum) from e
        run_dir = config.run_dir
        raise TrainingError(
            f"{e}; the checkpoint of the last completed update ({state.update}) is in "
            f"{run_dir}; resume with --resume {run_dir}"
        ) from e


def _advantages(
    config: TRPOConfig, rollout: Rollout, dp: DataParallel
) -> tuple[PolicyBatch, Tensor]:
    """Step 2: GAE(γ, λ) advantages (standardised over the global batch) and value targets,
    flattened to ``B = T·N`` rows: ``(PolicyBatch, returns (B,))``."""
    advantages, returns = compute_gae(
        rollout.rewards,
        rollout.values,
        rollout.next_values,
        rollout.terminations,
        rollout.truncations,
        config.gamma,
        config.gae_lambda,
    )
    adv = advantages.reshape(-1)
    if config.normalize_advantages:
        adv = normalize_advantages(adv, reducer=dp.reducer)
    if config.policy == "gru":  # sequences of bptt_length steps (trpo.recurrent)
        obs, actions, adv, masks, returns = sequence_batch(
            rollout.obs, config.bptt_length or rollout.n_steps, rollout.actions,
            adv.reshape(advantages.shape), rollout.action_masks, returns,
        )
        return PolicyBatch(obs, actions, adv, masks), returns
    obs = rollout.obs.reshape(rollout.batch_size, *rollout.obs.shape[2:])
    actions = rollout.actions.reshape(rollout.batch_size, *rollout.actions.shape[2:])
    masks = rollout.action_masks
    if masks is not None:
        masks = masks.reshape(rollout.batch_size, -1)
    batch = PolicyBatch(obs=obs, actions=actions, advantages=adv, masks=masks)
    return batch, returns.reshape(-1)


def _update(
    config: TRPOConfig,
    state: _State,
    batch: PolicyBatch,
    returns: Tensor,
    dp: DataParallel,
) -> _Update:
    """Steps 3-4: the trust-region policy step, then the critic fit (skipped when the policy
    step was non-finite: a batch that broke it is not fitted either)."""
    t0 = time.perf_counter()
    step = policy_step(
        state.actor,
        batch,
        settings=PolicyStepSettings.from_config(config),
        generator=state.cpu_generator,
        reducer=dp.reducer,
    )
    t1 = time.perf_counter()
    fit = CriticFitResult(value_loss=math.nan, steps=0)
    if step.status != StepStatus.NON_FINITE.name:
        fit = fit_critic(
            state.critic,
            state.critic_opt,
            batch.obs.flatten(0, batch.obs.ndim - 2) if config.policy == "gru" else batch.obs,
            returns,
            settings=CriticSettings.from_config(config),
            generator=state.cpu_generator,
            reducer=dp.reducer,
        )
    return _Update(step, fit, t1 - t0, time.perf_counter() - t1)


# ------------------------------------------------------------------- logging, checkpoints
class _Reporter:
    """Step 5: the metrics row (every ``log_every`` updates, the last one and every rejected
    one), the progress bar, and without a terminal a text line every 5 % of the run. Rank 0
    alone writes; every rank takes part in gathering the episode statistics."""

    def __init__(
        self, config: TRPOConfig, dp: DataParallel, num_updates: int, global_step: int
    ) -> None:
        self.config, self.dp, self.num_updates = config, dp, num_updates
        resume_step = global_step if config.resume is not None else None
        self.logger: MetricsLogger | NullLogger = (
            MetricsLogger(config.run_dir, tensorboard=config.tensorboard, resume_step=resume_step)
            if dp.is_main
            else NullLogger()
        )
        self.progress = config.progress and dp.is_main
        self.bar = ProgressBar(config.total_steps, initial=global_step, enabled=self.progress)
        self.recent_returns: collections.deque[float] = collections.deque(maxlen=20)
        self.text_every = max(1, num_updates // 20)
        self.t_start, self.steps_at_start = time.perf_counter(), global_step

    def say(self, message: str) -> None:
        if self.bar.enabled:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def announce(self, update: int, result: _Update, ok: bool, failures: int) -> None:
        """One line for a rejected (non-finite) update or a degenerate, safe no-op step."""
        if not ok:
            what = "critic fit" if result.policy_ok else "policy step"
            self.say(
                f"update {update}: non-finite {what} rejected, parameters kept "
                f"({failures}/{self.config.max_consecutive_failures})"
            )
        elif result.step.status != StepStatus.OK.name:
            self.say(f"update {update}: {StepStatus[result.step.status].message}")

    def log(
        self,
        state: _State,
        rollout: Rollout,
        returns: Tensor,
        result: _Update,
        ok: bool,
        failures: int,
        rollout_seconds: float,
    ) -> None:
        ep_returns = self.dp.gather(rollout.episode_returns)  # the episodes of every rank
        ep_lengths = self.dp.gather(rollout.episode_lengths)
        self.recent_returns.extend(ep_returns.tolist())
        elapsed = time.perf_counter() - self.t_start
        step, fit = result.step, result.fit
        values = rollout.values.reshape(-1)
        metrics = {
            "charts/episode_return": float(ep_returns.mean()) if ep_returns.numel() else None,
            "charts/episode_length": (
                float(ep_lengths.double().mean()) if ep_lengths.numel() else None
            ),
            "charts/episodes": ep_returns.numel(),
            "charts/steps_per_second": (state.global_step - self.steps_at_start)
            / max(elapsed, 1e-9),
            "trpo/kl": step.kl,
            "trpo/surrogate_improvement": step.surrogate_improvement,
            "trpo/expected_improvement": step.expected_improvement,
            "trpo/step_fraction": step.step_fraction,
            "trpo/line_search_success": float(step.applied),
            "trpo/line_search_tries": step.line_search_tries,
            "trpo/grad_norm": step.grad_norm,
            "trpo/step_norm": step.step_norm,
            "trpo/entropy": step.entropy,
            "trpo/explained_variance": explained_variance(values, returns, self.dp.reducer),
            "trpo/value_loss": fit.value_loss if result.policy_ok else None,
            "trpo/nonfinite_update": float(not ok),
            "trpo/consecutive_failures": failures,
            "natgrad/cg_iterations": step.cg_iterations,
            "natgrad/cg_residual": step.cg_residual,
            "time/rollout_seconds": rollout_seconds,
            "time/policy_step_seconds": result.policy_seconds,
            "time/critic_seconds": result.critic_seconds,
            "time/update_seconds": result.policy_seconds + result.critic_seconds,
        }
        update = state.update
        if update % self.config.log_every == 0 or update == self.num_updates or not ok:
            try:
                self.logger.log(state.global_step, metrics)
            except OSError as e:
                raise _write_failed(self.config.run_dir, "metrics.csv", e) from e
        recent = float(np.mean(self.recent_returns)) if self.recent_returns else None
        self.bar.update(state.global_step, episode_return=recent, kl=step.kl)
        if not self.bar.enabled and self.progress and update % self.text_every == 0:
            shown = math.nan if recent is None else recent
            print(
                f"step {state.global_step:>9d}/{self.config.total_steps}  return {shown:8.1f}"
                f"  kl {step.kl:.4f}  {metrics['charts/steps_per_second']:7.0f} steps/s",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


class _Checkpoints:
    """Step 6: rank 0 writes ``ckpt_<update>`` of the state, at most once per update (an error
    path that would save the same state again, e.g. right after a resume, leaves it be)."""

    def __init__(
        self, config: TRPOConfig, dp: DataParallel, reporter: _Reporter, last_saved: int
    ) -> None:
        self.config, self.dp, self.reporter, self.last_saved = config, dp, reporter, last_saved

    def save(self, state: _State) -> None:
        if state.update == self.last_saved or not self.dp.is_main:
            return
        saved: dict[str, Any] = {
            "actor": state.actor.state_dict(),
            "critic": state.critic.state_dict(),
            "critic_optimizer": state.critic_opt.state_dict(),
            "rng": capture_rng_state(torch_generator=state.generator),
            "rng_cpu": state.cpu_generator.get_state(),
            "update": state.update,
            "global_step": state.global_step,
            "config": self.config.to_dict(),
            # In a distributed run each rank's RNG is derived from (seed, rank, update).
            "world_size": self.dp.world_size,
        }
        if state.user_modules:
            saved["user_modules"] = list(state.user_modules)
        if state.obs_rms is not None:
            saved["obs_rms"] = state.obs_rms.state_dict()
        if state.reward_scaler is not None:
            saved["reward_scaler"] = state.reward_scaler.state_dict()
        run_dir = self.config.run_dir
        try:
            self.reporter.logger.flush()
            save_run_checkpoint(run_dir, state.update, saved, keep=self.config.keep_checkpoints)
        except OSError as e:
            raise _write_failed(run_dir, f"the checkpoint of update {state.update}", e) from e
        self.last_saved = state.update


def _write_failed(run_dir: Path, what: str, error: OSError) -> TrainingError:
    """The error of a write that failed (a full disk, ``ulimit -f``, permissions), saying
    which complete checkpoint a resume would start from."""
    done = list_checkpoints(run_dir)
    after = (
        f"then resume from {done[0][1].name} with --resume {run_dir}"
        if done
        else "then start the run again (it has no complete checkpoint yet)"
    )
    return TrainingError(
        f"cannot write {what} in {run_dir}: {type(error).__name__}: {error}; free disk space "
        f"or raise the file-size limit (ulimit -f), {after}"
    )


def _finish(config: TRPOConfig, state: _State, dp: DataParallel) -> TrainResult:
    """The learning-curve SVG and the final deterministic evaluation (rank 0)."""
    run_dir = config.run_dir
    if config.plot and dp.is_main:
        plot_learning_curve(
            run_dir / "metrics.csv", run_dir / "learning_curve.svg", title=config.env_id
        )
    if state.obs_rms is not None:
        state.obs_rms.frozen = True
    eval_returns: list[float] = []
    if config.eval_episodes > 0 and dp.is_main:
        eval_returns = evaluate_policy(
            state.actor,
            config.env_id,
            episodes=config.eval_episodes,
            obs_normalizer=state.obs_rms,
            seed=config.seed + 10_000,
            action_masks=config.action_masks,
        )
        print(
            f"evaluation over {len(eval_returns)} episodes: mean return "
            f"{np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f}  (run dir: {run_dir})",
            flush=True,
        )
    return TrainResult(
        actor=state.actor,
        critic=state.critic,
        obs_normalizer=state.obs_rms,
        config=config,
        run_dir=run_dir,
        metrics=read_metrics(run_dir / "metrics.csv") if dp.is_main else {},
        eval_returns=eval_returns,
        global_step=state.global_step,
    )


# --------------------------------------------------------------------------------- helpers
def _resolve_backend(config: TRPOConfig) -> TRPOConfig:
    """``config`` with ``env_backend`` the one that runs (``"auto"`` resolved), which
    config.json then records.

    Raises:
        ValueError: envpool was asked for an id it lacks, or is not installed
            (:class:`trpo.envpool_env.EnvPoolUnavailable`, naming the extra).
    """
    backend = resolve_env_backend(config.env_backend, config.env_id)
    if backend == config.env_backend:
        return config
    return dataclasses.replace(config, env_backend=backend).with_given(config.given_fields)


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
