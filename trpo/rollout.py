"""Vector-env rollouts for on-policy learning, with low per-step overhead.

Envs come from :func:`trpo.envs.make_envs` (re-exported here), which builds them with
:func:`gymnasium.make_vec` in **same-step autoreset** mode: when
an episode ends at step ``t``, the env is reset inside that same ``step`` call,
the returned observation is already the first one of the next episode, and the
true final observation is in ``infos["final_obs"][i]`` (mask
``infos["_final_obs"]``). So every stored transition ``(s_t, a_t, r_t, s'_t)`` is
a real one: gymnasium's default next-step mode, where the step after an episode
end is a fake "reset transition", never arises here, and the value of a
truncated episode is bootstrapped from its true final observation.

Where the time goes, and what :func:`collect_rollout` does about it (on
CartPole a raw ``env.step`` costs ~10 µs, so every µs of overhead counts):

* **One batched actor forward per vector step, in numpy** for CPU actors
  (:meth:`trpo.policy.Actor.numpy_inference_fn`: a numpy op on a tiny array
  costs a fraction of a torch op), in torch under ``torch.inference_mode``
  otherwise; inputs are rows of a preallocated observation buffer, no copies.
* **All sampling noise of the rollout is drawn in one call** before the loop
  (:func:`trpo.policy.draw_noise`, with the explicit generator), so a step
  samples with one or two array ops (Gumbel-max / ``μ + σε``).
* **The critic and the log-probabilities are not evaluated per step**: the
  parameters do not change during a rollout, so ``V(s_t)``, ``V(s'_t)`` (with
  the final observations of ended episodes patched in) and
  ``log π(a_t|s_t)`` are computed after the loop in one batched torch pass
  each, which is mathematically the same and far cheaper than ``T`` small
  passes; the log-probabilities are thus always the torch actor's.
* **Sync envs are stepped directly** (``SyncVectorEnv.envs``, same-step
  autoreset semantics reproduced exactly), skipping the vector env's batching
  and info-dict machinery, which costs more than a cheap env's own step.
  Async envs and envpool (:mod:`trpo.envpool_env`) go through ``envs.step``; an
  envpool env with two ``groups`` (async collection) is stepped in alternation, the
  policy acting for one half while the other simulates (:func:`_collect_pipelined`).
* Rewards, flags and raw observations go into preallocated numpy arrays;
  episode statistics and the finiteness check run once after the loop, on
  those arrays.

Observation normalisation: the policy sees ``normalize(obs)`` with the
statistics as they were at the start of the rollout (so every observation of a
batch is normalised the same way, and the stored ``obs`` are exactly what the
policy saw); the statistics are updated once after the rollout with its
``T·N`` raw observations. Reward scaling (:class:`trpo.normalize.RewardScaler`)
is likewise applied to the whole ``(T, N)`` block after the rollout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from torch import Tensor, nn

from natgrad.families import mask_logits
from trpo.envs import make_envs
from trpo.masks import env_mask, mask_source, vector_masks
from trpo.normalize import RewardScaler, RunningMeanStd
from trpo.policy import Actor, draw_noise, log_prob, sample_from_noise
from trpo.recurrent import SequenceRecord

__all__ = [
    "Rollout",
    "RolloutState",
    "collect_rollout",
    "env_action_converter",
    "init_rollout_state",
    "make_envs",
    "numpy_mode_fn",
]

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass
class RolloutState:
    """What a collector carries from one rollout to the next (mutable).

    Attributes:
        env_id: For error messages.
        obs: ``(N, *obs_shape)`` raw (unnormalised) current observation.
        episode_returns: ``(N,)`` float64 undiscounted raw return of the running episodes.
        episode_lengths: ``(N,)`` int64 length of the running episodes.
        global_step: Env steps taken so far (``N`` per vector step).
        mask_source: Where the action masks come from (:mod:`trpo.masks`), None = no masks.
        masks: ``(N, ΣK)`` bool action masks of the current states (with ``mask_source``).
        hidden: ``(N, H)`` a recurrent policy's state after the last step (None: zeros).
        starts: ``(N,)`` bool, whether the current observations start episodes (None: all).
    """

    env_id: str
    obs: np.ndarray
    episode_returns: np.ndarray
    episode_lengths: np.ndarray
    global_step: int = 0
    mask_source: str | None = None
    masks: np.ndarray | None = None
    hidden: Tensor | None = None
    starts: np.ndarray | None = None


def init_rollout_state(
    envs: VectorEnv, seed: int, *, global_step: int = 0, action_masks: str = "off"
) -> RolloutState:
    """Reset the envs (env ``i`` with seed ``seed + i``) and start a :class:`RolloutState`.

    Args:
        envs: From :func:`make_envs` (same-step autoreset).
        seed: Base seed.
        global_step: Starting step counter (e.g. when resuming).
        action_masks: ``"auto"``, ``"on"`` or ``"off"`` (:mod:`trpo.masks`).

    Raises:
        ValueError: If ``envs`` does not use same-step autoreset, a reset observation is
            not finite, or ``action_masks="on"`` and the envs provide no masks.
    """
    mode = envs.metadata.get("autoreset_mode")
    if mode != AutoresetMode.SAME_STEP:
        raise ValueError(
            f"envs must use AutoresetMode.SAME_STEP (got {mode}); create them with make_envs"
        )
    n = envs.num_envs
    env_id = envs.spec.id if envs.spec is not None else "<unknown env>"
    obs, infos = envs.reset(seed=[int(seed) + i for i in range(n)])
    source = mask_source(action_masks, envs.single_action_space, infos, envs)
    finite = np.isfinite(np.asarray(obs, dtype=np.float64).reshape(n, -1)).all(1)
    if not finite.all():
        raise ValueError(
            f"env {env_id!r} returned a non-finite observation from reset "
            f"(env indices {np.flatnonzero(~finite).tolist()}, seed {seed})"
        )
    return RolloutState(
        env_id=env_id,
        obs=np.array(obs, copy=True),
        episode_returns=np.zeros(n, dtype=np.float64),
        episode_lengths=np.zeros(n, dtype=np.int64),
        global_step=int(global_step),
        mask_source=source,
        masks=vector_masks(envs, infos, source) if source is not None else None,
    )


@dataclass(frozen=True)
class Rollout:
    """One rollout of ``T`` vector steps over ``N`` envs, time-major.

    Attributes:
        obs: ``(T, N, *obs_shape)`` observations ``s_t`` as the policy saw them (normalised).
        actions: ``(T, N)`` int64 (Discrete), ``(T, N, d)`` float unclipped samples (Box),
            ``(T, N, k)`` int64 (MultiDiscrete), ``(T, N, d)`` float 0/1 (MultiBinary).
        log_probs: ``(T, N)`` ``log π_old(a_t|s_t)`` of the stored (unclipped) actions.
        rewards: ``(T, N)`` rewards for learning (scaled if a reward scaler was given).
        terminations: ``(T, N)`` bool.
        truncations: ``(T, N)`` bool.
        values: ``(T, N)`` ``V(s_t)``.
        next_values: ``(T, N)`` ``V(s'_t)`` of the true next observation (the final
            observation where the episode ended at ``t``).
        episode_returns: ``(E,)`` float64 raw undiscounted returns of the episodes that
            ended during this rollout, in the order they ended.
        episode_lengths: ``(E,)`` int64 their lengths.
        global_step: Env steps taken after this rollout.
        action_masks: ``(T, N, ΣK)`` bool masks of ``s_t`` (None without masks).
    """

    obs: Tensor
    actions: Tensor
    log_probs: Tensor
    rewards: Tensor
    terminations: Tensor
    truncations: Tensor
    values: Tensor
    next_values: Tensor
    episode_returns: Tensor
    episode_lengths: Tensor
    global_step: int
    action_masks: Tensor | None = None

    @property
    def n_steps(self) -> int:
        """``T``."""
        return self.rewards.shape[0]

    @property
    def n_envs(self) -> int:
        """``N``."""
        return self.rewards.shape[1]

    @property
    def batch_size(self) -> int:
        """``T·N`` transitions."""
        return self.rewards.numel()


def env_action_converter(action_space: gym.Space) -> Callable[[np.ndarray], np.ndarray]:
    """The map from a batch of sampled actions (numpy) to what the vector env accepts.

    Box: clipped to ``[low, high]`` (the stored action stays unclipped) and cast to the
    space's dtype; Discrete / MultiDiscrete: shifted by ``start``; MultiBinary: int8.
    """
    if isinstance(action_space, gym.spaces.Box):
        low, high, dtype = action_space.low, action_space.high, action_space.dtype
        # maximum/minimum rather than np.clip, whose Python-level wrapper costs more
        # than the op itself on small arrays; returns a new array (the sample is kept).
        return lambda a: np.minimum(np.maximum(a, low), high).astype(dtype, copy=False)
    if isinstance(action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        start = np.asarray(action_space.start)
        if np.any(start != 0):
            return lambda a: a + start
        return lambda a: a
    if isinstance(action_space, gym.spaces.MultiBinary):
        return lambda a: a.astype(np.int8)
    raise ValueError(f"action_space {action_space!r} is not supported")


def _check_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> torch.device:
    p = next(module.parameters())
    if p.dtype != dtype:
        raise ValueError(
            f"dtype is {dtype} but the {name}'s parameters are {p.dtype}; "
            f"convert the {name} (e.g. .to({dtype})) or pass dtype={p.dtype}"
        )
    return p.device


def _raise_if_nonfinite(
    env_id: str,
    step0: int,
    next_obs: np.ndarray,
    rewards: np.ndarray,
    finals: Sequence[tuple[int, int, np.ndarray]],
    cause: BaseException | None = None,
) -> None:
    """Raise ``ValueError`` naming the first vector step with a non-finite output.

    ``next_obs`` ``(t, N, ...)`` and ``rewards`` ``(t, N)`` are the rows stored so far
    (row ``j`` came from vector step ``j``); ``finals`` the final observations.
    """
    n_rows, n_envs = rewards.shape
    bad = {
        "observation": ~np.isfinite(next_obs.reshape(n_rows, n_envs, -1)).all(-1),
        "reward": ~np.isfinite(rewards),
        "final observation": np.zeros((n_rows, n_envs), dtype=np.bool_),
    }
    for t, i, f in finals:
        if t < n_rows and not np.isfinite(f).all():
            bad["final observation"][t, i] = True
    first = None
    for what, mask in bad.items():
        rows = np.flatnonzero(mask.any(1))
        if rows.size and (first is None or rows[0] < first[0]):
            first = (int(rows[0]), what, np.flatnonzero(mask[rows[0]]).tolist())
    if first is not None:
        t, what, envs_bad = first
        raise ValueError(
            f"env {env_id!r} returned a non-finite {what} at global step {step0 + t * n_envs} "
            f"(env indices {envs_bad}); the rollout was discarded and no statistic updated"
        ) from cause


def _raise_env_error(
    env_id: str,
    step0: int,
    t: int,
    obs_buf: np.ndarray,
    rew_buf: np.ndarray,
    finals: Sequence[tuple[int, int, np.ndarray]],
    error: Exception,
) -> None:
    """An env raised during vector step ``t``: ``ValueError`` if an output stored before it
    was non-finite (the likelier root cause), else ``RuntimeError`` naming the step."""
    _raise_if_nonfinite(env_id, step0, obs_buf[1 : t + 1], rew_buf[:t], finals, error)
    raise RuntimeError(
        f"env {env_id!r} raised during step at global step {step0 + t * rew_buf.shape[1]}: "
        f"{type(error).__name__}: {error}"
    ) from error


def _env_stepper(
    envs: VectorEnv,
    obs_buf: np.ndarray,
    rew_buf: np.ndarray,
    term_buf: np.ndarray,
    trunc_buf: np.ndarray,
    finals: list[tuple[int, int, np.ndarray]],
    mask_buf: np.ndarray | None = None,
    source: str | None = None,
) -> Callable[[int, np.ndarray], None]:
    """``step(t, actions)``: one vector step written into row ``t`` (``t + 1`` for obs).

    For a ``SyncVectorEnv`` the sub-envs are stepped directly, with exactly its
    same-step autoreset semantics (step; if terminated or truncated keep the final
    observation and reset at once) but without its batching, info-dict and copy
    machinery, which costs more than a cheap env's own step. Any other vector env
    (``AsyncVectorEnv``) goes through ``envs.step``. With ``mask_buf``, row ``t + 1`` gets
    the action masks of the new states (from ``source``, :mod:`trpo.masks`).
    """
    if isinstance(envs, SyncVectorEnv):
        sub_envs = tuple(envs.envs)

        def step_sync(t: int, actions: np.ndarray) -> None:
            next_obs, rew, term, trunc = obs_buf[t + 1], rew_buf[t], term_buf[t], trunc_buf[t]
            # Discrete actions as Python ints: Discrete.contains (asserted by e.g. CartPole's
            # step) runs numpy dtype checks on a numpy integer that cost as much as the physics.
            per_env = actions.tolist() if actions.ndim == 1 else actions
            for i, env in enumerate(sub_envs):
                obs, r, te, tr, info = env.step(per_env[i])
                if te or tr:
                    finals.append((t, i, np.array(obs)))
                    obs, info = env.reset()
                next_obs[i] = obs
                if mask_buf is not None:
                    mask_buf[t + 1, i] = env_mask(env, info, source)
                rew[i], term[i], trunc[i] = r, te, tr

        return step_sync

    def step_vector(t: int, actions: np.ndarray) -> None:
        obs, rew, term, trunc, infos = envs.step(actions)
        if "_final_obs" in infos:
            fin = infos["final_obs"]
            for i in np.flatnonzero(infos["_final_obs"]):
                finals.append((t, int(i), np.array(fin[i])))
        obs_buf[t + 1] = obs
        if mask_buf is not None:
            mask_buf[t + 1] = vector_masks(envs, infos, source)
        rew_buf[t] = rew
        term_buf[t] = term
        trunc_buf[t] = trunc

    return step_vector


def _torch_policy(
    actor: Actor, noise: Tensor | list[Tensor], normalizer: RunningMeanStd | None, device,
    policy: Callable[[int, Tensor], Any] | None = None,
) -> Callable[..., np.ndarray]:
    """``(t, raw obs (N, ...), masks (N, ΣK) or None, rows or None) -> action (numpy)`` with
    the torch actor (any device); ``rows`` selects one half's noise in async collection.
    ``policy(t, x)`` gives the distribution parameters (default: the actor on ``x``)."""
    family = actor.family
    if policy is None:
        forward = actor.inference_fn()
        policy = lambda t, x: forward(x)  # noqa: E731
    normalize = normalizer.normalize if normalizer is not None else None
    cpu = device.type == "cpu"
    # Per-step noise views made once (indexing a list of heads every step costs more).
    steps = list(zip(*(n.unbind(0) for n in noise))) if isinstance(noise, list) else noise.unbind(0)

    def act(
        t: int, obs: np.ndarray, mask: np.ndarray | None = None, rows: slice | None = None
    ) -> np.ndarray:
        x = torch.from_numpy(obs)
        if not cpu:
            x = x.to(device, non_blocking=True)
        if normalize is not None:
            x = normalize(x)
        params = policy(t, x)
        if mask is not None:
            params = mask_logits(params, torch.from_numpy(mask).to(device), check=False)
        eps = steps[t] if rows is None else _rows_of(steps[t], rows)
        a = sample_from_noise(family, params, eps)
        return a.numpy() if cpu else a.cpu().numpy()

    return act


def _numpy_policy(
    actor: Actor, noise: Tensor | list[Tensor], normalizer: RunningMeanStd | None, dtype
) -> Callable[..., np.ndarray]:
    """The same map as :func:`_torch_policy` in numpy (CPU actor): the sampling rules of
    :func:`trpo.policy.sample_from_noise` applied to :meth:`Actor.numpy_inference_fn`."""
    policy, family = actor.numpy_inference_fn(), actor.family
    normalize = normalizer.numpy_normalizer(dtype) if normalizer is not None else None
    if family == "multi_categorical":
        heads = [n.numpy() for n in noise]
        steps = [[h[t] for h in heads] for t in range(heads[0].shape[0])]
    else:
        steps = noise.numpy()

    if family == "categorical":

        def sample(params, eps):
            return (params + eps).argmax(-1)

    elif family == "diag_gaussian":
        std = np.exp(actor.log_std.detach().numpy())

        def sample(params, eps):
            return params[0] + std * eps

    elif family == "multi_categorical":

        def sample(params, eps):
            return np.stack([(lg + g).argmax(-1) for lg, g in zip(params, eps)], axis=-1)

    else:

        def sample(params, eps):
            return (params > eps).astype(params.dtype)

    splits = np.cumsum(actor.nvec)[:-1]

    def act(
        t: int, obs: np.ndarray, mask: np.ndarray | None = None, rows: slice | None = None
    ) -> np.ndarray:
        params = policy(normalize(obs) if normalize is not None else obs)
        if mask is not None and family == "multi_categorical":  # −inf logits: never sampled
            params = [np.where(m, p, -np.inf) for p, m in zip(params, np.split(mask, splits, -1))]
        elif mask is not None:
            params = np.where(mask, params, -np.inf)
        return sample(params, steps[t] if rows is None else _rows_of(steps[t], rows))

    return act


def _rows_of(noise: Any, rows: slice) -> Any:
    """The rows ``rows`` of one step's noise (an array, or a list/tuple of heads)."""
    return [h[rows] for h in noise] if isinstance(noise, (list, tuple)) else noise[rows]


def _collect_pipelined(
    envs: Any,
    act: Callable[..., np.ndarray],
    to_env: Callable[[np.ndarray], np.ndarray],
    bufs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    finals: list[tuple[int, int, np.ndarray]],
    act_buf: list[np.ndarray],
    done: list[int],
) -> None:
    """Steps ``0..T-1`` of an env with two :attr:`groups` (``EnvPoolVectorEnv(pipelined=
    True)``): the policy acts for one half while the other half simulates.

    Order: act(0, A) send A; then per step t: act(t, B) send B | recv A (t) | act(t+1, A) send
    A | recv B (t). Each env still takes its ``T`` steps in order, each with its action from its
    own observation, and every action comes from the same (current) policy and the same noise
    rows as in the synchronous loop, so the rollout is the same, only faster.
    ``done[0]`` counts the vector steps whose every row is stored (for error messages).
    """
    obs_buf, rew_buf, term_buf, trunc_buf = bufs
    T = rew_buf.shape[0]

    def launch(t: int, g: int) -> None:
        rows = envs.groups[g]
        a = act(t, obs_buf[t, rows], None, rows)
        if not act_buf:
            act_buf.append(np.empty((T, obs_buf.shape[1], *a.shape[1:]), dtype=a.dtype))
        act_buf[0][t, rows] = a
        envs.send(g, to_env(a))

    def land(t: int, g: int) -> None:
        rows = envs.groups[g]
        obs_buf[t + 1, rows], rew_buf[t, rows], term_buf[t, rows], trunc_buf[t, rows], fin = (
            envs.recv(g)
        )
        finals.extend((t, rows.indices(obs_buf.shape[1])[0] + i, f) for i, f in fin.items())

    launch(0, 0)
    for t in range(T):
        launch(t, 1)
        land(t, 0)
        if t + 1 < T:
            launch(t + 1, 0)
        land(t, 1)
        done[0] = t + 1


def collect_rollout(
    envs: VectorEnv,
    actor: Actor,
    critic: nn.Module,
    n_steps: int,
    *,
    state: RolloutState,
    generator: torch.Generator,
    obs_normalizer: RunningMeanStd | None = None,
    reward_scaler: RewardScaler | None = None,
    dtype: torch.dtype = torch.float32,
    policy_backend: Literal["auto", "numpy", "torch"] = "auto",
) -> Rollout:
    """Step the vector env ``n_steps`` times with the current policy.

    Continues from ``state`` (observation, running episodes, step counter) and
    advances it on success. Box actions are clipped to the bounds for the env;
    the stored action and its log-probability are those of the unclipped sample.

    Args:
        envs: Same-step-autoreset vector env from :func:`make_envs`.
        actor: The policy (parameters in ``dtype``, on the device the rollout tensors go to).
        critic: Value function ``(*B, *obs_shape) -> (*B,)``.
        n_steps: ``T`` vector steps (``T·N`` transitions).
        state: From :func:`init_rollout_state`; updated in place on success.
        generator: RNG for the action noise (on the actor's device).
        obs_normalizer: If given, the policy and critic see normalised observations
            and its statistics are updated after the rollout (unless frozen).
        reward_scaler: If given, ``Rollout.rewards`` are scaled by it.
        dtype: Floating dtype of the stored tensors (float32 or float64).
        policy_backend: How the per-step policy runs: ``"numpy"`` (CPU actors; a
            numpy op costs a fraction of a torch op on tiny arrays), ``"torch"``
            (any device), ``"auto"`` (numpy on CPU). Both sample from the same noise
            and agree up to float rounding; the stored log-probabilities are always
            computed by the torch actor afterwards.

    Returns:
        The :class:`Rollout`.

    Raises:
        ValueError: On bad arguments, or a non-finite observation or reward
            (naming the env and the global step of the first one; raised before
            anything is returned or any statistic or ``state`` is updated).
        RuntimeError: If an env raises during ``step`` (naming the env and step).
            After either error the envs are in an unknown state: reset them
            with :func:`init_rollout_state`.
    """
    device = _check_rollout_args(envs, actor, critic, n_steps, state, dtype, policy_backend)
    T, N = n_steps, envs.num_envs
    env_id, step0 = state.env_id, state.global_step
    normalize = obs_normalizer.normalize if obs_normalizer is not None else None
    buf = _Buffers.allocate(T, state, _NUMPY_DTYPES[dtype])
    with torch.inference_mode():
        rec, act = _policy_for_rollout(actor, buf, state, generator, obs_normalizer, device,
                                       policy_backend)
        _run_steps(envs, act, buf, env_id, step0)
        if rec is not None:  # the state s_T is seen with: what V(s_T) and the next rollout use
            rec.state_in(T, buf.term[T - 1] | buf.trunc[T - 1])

    # One vectorised check for the whole rollout instead of one per step; the policy
    # may have acted on a non-finite observation meanwhile, but nothing of this
    # rollout is returned, stored or used to update any statistic.
    _raise_if_nonfinite(env_id, step0, buf.obs[1:], buf.rew, buf.finals)

    # ---- after the loop: batched critic / log-prob passes, statistics -----------------
    with torch.no_grad():
        obs_policy, values, next_values = _critic_pass(critic, buf, normalize, device, rec)
        actions = torch.from_numpy(buf.act).to(device)
        masks = None if buf.mask is None else torch.from_numpy(buf.mask[:T]).to(device)
        log_probs = _log_probs(actor, obs_policy, actions, masks)

    terminations = torch.from_numpy(buf.term)
    truncations = torch.from_numpy(buf.trunc)
    rewards = torch.from_numpy(buf.rew)
    if reward_scaler is not None:
        rewards = reward_scaler.scale(rewards, terminations | truncations)
    if obs_normalizer is not None:
        obs_normalizer.update(buf.obs[:T].reshape(T * N, *buf.obs.shape[2:]))

    ep_returns, ep_lengths = _episode_statistics(buf.rew, buf.term | buf.trunc, state)
    state.obs = buf.obs[T].copy()
    if buf.mask is not None:
        state.masks = buf.mask[T].copy()
    if rec is not None:
        state.hidden, state.starts = rec.h_out[T - 1].clone(), buf.term[T - 1] | buf.trunc[T - 1]
    state.global_step = step0 + T * N
    return Rollout(
        obs=obs_policy,
        actions=actions,
        log_probs=log_probs,
        rewards=rewards.to(device=device, dtype=dtype),
        terminations=terminations.to(device),
        truncations=truncations.to(device),
        values=values,
        next_values=next_values,
        episode_returns=ep_returns,
        episode_lengths=ep_lengths,
        global_step=state.global_step,
        action_masks=masks,
    )


def _check_rollout_args(
    envs: VectorEnv, actor: Actor, critic: nn.Module, n_steps: int, state: RolloutState,
    dtype: torch.dtype, policy_backend: str,
) -> torch.device:
    """The argument checks of :func:`collect_rollout`; returns the actor's device."""
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps <= 0:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if policy_backend not in ("auto", "numpy", "torch"):
        raise ValueError(
            f"policy_backend must be 'auto', 'numpy' or 'torch', got {policy_backend!r}"
        )
    device = _check_dtype(actor, "actor", dtype)
    _check_dtype(critic, "critic", dtype)
    if state.obs.shape[0] != envs.num_envs:
        raise ValueError(
            f"state has {state.obs.shape[0]} envs but envs has {envs.num_envs}; use "
            "init_rollout_state"
        )
    if getattr(actor, "recurrent", False) and len(getattr(envs, "groups", ())) == 2:
        raise ValueError("a recurrent actor needs every env stepped each step: no async envpool")
    if policy_backend == "numpy" and device.type != "cpu":
        raise ValueError("policy_backend='numpy' needs the actor on the CPU")
    if policy_backend == "numpy" and actor.numpy_inference_fn is None:
        raise ValueError("policy_backend='numpy' needs the built-in MLP actor")
    return device


@dataclass
class _Buffers:
    """The rollout's preallocated numpy arrays: raw obs ``(T+1, N, ...)`` in the rollout
    dtype (row t+1 is s_{t+1}, or the first obs of the next episode), rewards ``(T, N)``,
    termination/truncation flags ``(T, N)``, masks ``(T+1, N, ΣK)`` or None, actions
    ``(T, N, ...)`` (allocated at the first action), and ``(t, i, final obs)`` of the
    episodes that ended."""

    obs: np.ndarray
    rew: np.ndarray
    term: np.ndarray
    trunc: np.ndarray
    mask: np.ndarray | None
    source: str | None
    finals: list[tuple[int, int, np.ndarray]]
    act: np.ndarray | None = None

    @classmethod
    def allocate(cls, T: int, state: RolloutState, obs_dtype: Any) -> _Buffers:
        N = state.obs.shape[0]
        obs = np.empty((T + 1, *state.obs.shape), dtype=obs_dtype)
        obs[0] = state.obs
        mask = None
        if state.mask_source is not None:
            mask = np.empty((T + 1, *state.masks.shape), dtype=np.bool_)
            mask[0] = state.masks
        flags = (np.empty((T, N), dtype=np.bool_) for _ in range(2))
        return cls(obs, np.empty((T, N), dtype=np.float64), *flags, mask, state.mask_source, [])


def numpy_mode_fn(
    actor: Any, normalizer: RunningMeanStd | None
) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None:
    """``(raw obs (N, ...), masks (N, ΣK) or None) -> the mode's action (numpy)`` of a CPU,
    non-recurrent built-in actor, the rollout's numpy policy with zero noise: argmax of the
    logits (+ 0 Gumbel), the mean (+ σ·0), ``logits > 0`` (0 logistic), per head. ``None``
    where the numpy path does not apply (the caller keeps its torch path)."""
    if (
        getattr(actor, "recurrent", False)
        or getattr(actor, "numpy_inference_fn", None) is None
        or any(p.device.type != "cpu" for p in actor.parameters())
    ):
        return None
    dtype = next(actor.parameters()).dtype
    x0 = torch.zeros((1, *actor.obs_shape), dtype=dtype)
    with torch.no_grad():
        noise = draw_noise(actor.family, actor.inference_fn()(x0), torch.Generator(), (1,))
    zeros = [torch.zeros_like(n) for n in noise] if isinstance(noise, list) else noise.zero_()
    act = _numpy_policy(actor, zeros, normalizer, _NUMPY_DTYPES.get(dtype, np.float32))
    return lambda obs, mask: act(0, obs, mask)


def _policy_for_rollout(
    actor: Actor, buf: _Buffers, state: RolloutState, generator: torch.Generator,
    obs_normalizer: RunningMeanStd | None, device: torch.device, policy_backend: str,
) -> tuple[SequenceRecord | None, Callable[..., np.ndarray]]:
    """The per-step ``act`` (numpy or torch, :func:`collect_rollout`'s ``policy_backend``)
    with the rollout's noise drawn up front: one forward on ``s_0`` gives its shapes. For a
    recurrent actor also the :class:`~trpo.recurrent.SequenceRecord` its steps fill."""
    normalize = obs_normalizer.normalize if obs_normalizer is not None else None
    x0 = torch.from_numpy(buf.obs[0]).to(device)
    x0 = normalize(x0) if normalize is not None else x0
    T, N = buf.rew.shape
    if getattr(actor, "recurrent", False):
        rec = SequenceRecord.start(T, N, actor.hidden_size, state.hidden, state.starts, x0)
        noise = draw_noise(actor.family, actor.step(x0, None)[0], generator, batch_shape=(T,))

        def step(t: int, x: Tensor) -> Any:
            done = None if t == 0 else buf.term[t - 1] | buf.trunc[t - 1]
            params, rec.h_out[t] = actor.step(x, rec.state_in(t, done))
            return params

        return rec, _torch_policy(actor, noise, obs_normalizer, device, step)
    noise = draw_noise(actor.family, actor.inference_fn()(x0), generator, batch_shape=(T,))
    if actor.numpy_inference_fn is not None and (
        policy_backend == "numpy" or (policy_backend == "auto" and device.type == "cpu")
    ):
        return None, _numpy_policy(actor, noise, obs_normalizer, buf.obs.dtype)
    return None, _torch_policy(actor, noise, obs_normalizer, device)


def _run_steps(
    envs: VectorEnv, act: Callable[..., np.ndarray], buf: _Buffers, env_id: str, step0: int
) -> None:
    """Fill ``buf`` with ``T`` vector steps: pipelined over envpool's two pools when ``envs``
    has them (:func:`_collect_pipelined`), else one policy call and one ``step`` per t."""
    T = buf.rew.shape[0]
    to_env = env_action_converter(envs.single_action_space)
    if len(getattr(envs, "groups", ())) == 2:
        if buf.mask is not None:  # envpool reports no masks; refuse rather than ignore
            raise ValueError("action masks are not supported with envpool's async collection")
        holder: list[np.ndarray] = []
        done = [0]
        bufs = (buf.obs, buf.rew, buf.term, buf.trunc)
        try:
            _collect_pipelined(envs, act, to_env, bufs, buf.finals, holder, done)
        except Exception as e:
            _raise_env_error(env_id, step0, done[0], buf.obs, buf.rew, buf.finals, e)
        buf.act = holder[0]
        return
    env_step = _env_stepper(envs, buf.obs, buf.rew, buf.term, buf.trunc, buf.finals, buf.mask,
                            buf.source)
    for t in range(T):
        a_np = act(t, buf.obs[t], None if buf.mask is None else buf.mask[t])
        if buf.act is None:
            buf.act = np.empty((T, *a_np.shape), dtype=a_np.dtype)
        buf.act[t] = a_np
        try:
            env_step(t, to_env(a_np))
        except Exception as e:
            _raise_env_error(env_id, step0, t, buf.obs, buf.rew, buf.finals, e)


def _critic_pass(
    critic: nn.Module, buf: _Buffers, normalize: Callable[[Tensor], Tensor] | None,
    device: torch.device, rec: SequenceRecord | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One batched critic forward over every state of the rollout and the true final
    observations: ``(obs the policy saw (T, N, ...), V(s_t) (T, N), V(s'_t) (T, N))``, with
    ``V(s'_t)`` of an ended episode taken at its final observation (bootstrap on truncation;
    GAE ignores it on termination). With ``rec`` the observations are packed rows
    ``[start, h, x]`` (:mod:`trpo.recurrent`)."""
    T, N = buf.rew.shape
    obs_all = torch.from_numpy(buf.obs).to(device)
    flat = obs_all.reshape(-1, *obs_all.shape[2:])
    if buf.finals:
        fin = np.stack([f for _, _, f in buf.finals]).astype(buf.obs.dtype)
        flat = torch.cat([flat, torch.from_numpy(fin).to(device)])
    x_all = normalize(flat) if normalize is not None else flat
    if rec is not None:
        x_all = torch.cat([rec.features([(t, i) for t, i, _ in buf.finals]), x_all], -1)
    v_all = critic(x_all)
    v_grid = v_all[: (T + 1) * N].reshape(T + 1, N)
    values, next_values = v_grid[:T].clone(), v_grid[1:].clone()
    if buf.finals:
        t_idx = torch.tensor([t for t, _, _ in buf.finals], device=device)
        i_idx = torch.tensor([i for _, i, _ in buf.finals], device=device)
        next_values[t_idx, i_idx] = v_all[(T + 1) * N :]
    obs_policy = x_all[: T * N].reshape(T, N, *x_all.shape[1:])
    if normalize is None:
        obs_policy = obs_policy.clone()  # do not alias the numpy buffer
    return obs_policy, values, next_values


def _log_probs(actor: Actor, obs: Tensor, actions: Tensor, masks: Tensor | None) -> Tensor:
    """``log π(a_t | s_t)`` ``(T, N)`` by the torch actor on ``(T·N, *obs_shape)`` (the
    protocol of :mod:`trpo.modules`), masked logits where the env gives masks."""
    T, N = obs.shape[:2]
    dist = actor(obs.reshape(T * N, *obs.shape[2:]))
    if masks is not None:  # checked: a state without a valid action is an error
        dist = mask_logits(dist, masks.reshape(T * N, -1))
    log_probs = log_prob(actor.family, dist, actions.reshape(T * N, *actions.shape[2:]))
    return log_probs.reshape(T, N)


def _episode_statistics(
    rewards: np.ndarray, dones: np.ndarray, state: RolloutState
) -> tuple[Tensor, Tensor]:
    """Returns/lengths of the episodes that ended in this block; advances the accumulators."""
    T, N = rewards.shape
    ended: list[tuple[int, int, float, int]] = []
    for i in range(N):
        start = 0
        for end in np.flatnonzero(dones[:, i]):
            ret = state.episode_returns[i] + rewards[start : end + 1, i].sum()
            length = state.episode_lengths[i] + (end + 1 - start)
            ended.append((int(end), i, float(ret), int(length)))
            state.episode_returns[i], state.episode_lengths[i] = 0.0, 0
            start = end + 1
        state.episode_returns[i] += rewards[start:, i].sum()
        state.episode_lengths[i] += T - start
    ended.sort()
    return (
        torch.tensor([e[2] for e in ended], dtype=torch.float64),
        torch.tensor([e[3] for e in ended], dtype=torch.int64),
    )
