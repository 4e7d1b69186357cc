"""Data-parallel TRPO on ``torchrun``: what each rank does alone and what is shared.

Launched as ``torchrun --nproc-per-node N -m trpo.run ...`` (see docs/distributed.md), every
rank runs the whole training loop on its own envs (seeded apart: :meth:`DataParallel.env_seed`),
and every mean over samples is a mean over the *global* batch (``natgrad.distributed``):

* given :attr:`DataParallel.reducer` (a ``natgrad.distributed.Reducer``): the policy step
  (``trpo.update.policy_step``: the surrogate and its gradient, every Fisher-vector product,
  the line-search surrogate and KL, the entropy), the critic fit (``trpo.critic.fit_critic``:
  the gradient of every minibatch, all-reduced before each Adam step), the advantage
  normalisation (``trpo.gae.normalize_advantages``) and the explained variance
  (``trpo.critic.explained_variance``);
* here: the observation / return normaliser statistics (:class:`SyncedRunningMeanStd`,
  merged counts, means and variances) and the episode statistics (gathered);

so the parameters stay bit-identical on every rank; :meth:`DataParallel.check_agreement`
verifies it every update with a two-number checksum per rank. Rank 0 alone writes the config,
the metrics, the checkpoints and the progress bar.

:data:`SINGLE_PROCESS` is the one-rank :class:`DataParallel`: every method then returns its
input or calls the single-process function, so ``train`` runs the same code either way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from natgrad import distributed as nd
from natgrad.adam import Adam
from trpo.normalize import RewardScaler, RunningMeanStd

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RANK_SEED_STRIDE",
    "SINGLE_PROCESS",
    "TIMEOUT_ENV",
    "DataParallel",
    "NullLogger",
    "SyncedRunningMeanStd",
    "timeout_from_env",
]

TIMEOUT_ENV = "TRPO_DIST_TIMEOUT"
"""Environment variable: seconds a rank waits in a collective for its peers before failing."""
DEFAULT_TIMEOUT_S = 300.0
"""Default of :data:`TIMEOUT_ENV`: a rank that hangs stops the others after 5 minutes."""
RANK_SEED_STRIDE = 1_000_000_000
"""Env seeds of rank ``r`` are the single-process ones plus ``r · RANK_SEED_STRIDE``: far
apart from ``seed + 7919·update + env_index`` of any other rank for any realistic run."""


def timeout_from_env() -> float:
    """:data:`TIMEOUT_ENV` in seconds (default :data:`DEFAULT_TIMEOUT_S`).

    Raises:
        ValueError: the variable is set but not a number > 0.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


class SyncedRunningMeanStd(RunningMeanStd):
    """A :class:`RunningMeanStd` whose :meth:`update` merges the batches of *every* rank.

    Each rank computes the moments of its own batch; :func:`natgrad.distributed.merge_moments`
    combines them into the moments of the union (counts summed, means count-weighted,
    variances merged with the spread of the means: never averaged), and every rank merges
    that same global batch into its statistics, which therefore stay identical everywhere
    and equal to what one process would have after seeing all the data. Every rank must
    call :meth:`update` together (the rollout does, once per update); a rank with an empty
    batch still takes part.
    """

    def __init__(self, base: RunningMeanStd, *, group: Any = None) -> None:
        super().__init__(
            base.shape, epsilon=base.epsilon, clip=base.clip, frozen=base.frozen, raw=base.raw
        )
        self.load_state_dict(base.state_dict())
        self.group = group

    def update(self, x: Tensor | np.ndarray) -> None:
        """Merge the union of every rank's batch ``x`` ``(B_r, *shape)`` (collective).

        Raises:
            ValueError: If ``x`` has the wrong shape, or some rank's batch is not finite
                (raised on every rank; nothing is updated).
        """
        x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, *{self.shape}), got {tuple(x.shape)}")
        if self.frozen:
            return
        n = int(x.shape[0])
        if n > 0:
            mean, var = x.mean(0), x.var(0, correction=0)
        else:
            mean = var = torch.zeros(self.shape, dtype=torch.float64)
        # A non-finite batch makes the merged moments non-finite on every rank, so all
        # ranks refuse together instead of one raising while the others wait.
        mean, var, count = nd.merge_moments(mean, var, n, group=self.group)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError(
                "x contains non-finite values on at least one rank; refusing to update the "
                "statistics"
            )
        self.update_from_moments(mean, var, count)


class NullLogger:
    """Stands in for :class:`trpo.logger.MetricsLogger` on ranks other than 0 (writes nothing)."""

    def log(self, step: int, metrics: Any) -> None:
        """Ignore a row."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run, and the collectives ``train`` needs.

    Attributes:
        rank: Global rank (0 reports: logs, checkpoints, progress, evaluation).
        world_size: Number of ranks.
        local_rank: Rank on this node (picks the GPU).
        owns_group: :meth:`from_env` created the process group (:meth:`close` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0

    @property
    def reducer(self) -> nd.Reducer:
        """The reduction over ranks that the numerical steps receive: every mean over samples
        becomes a mean over the global batch (the identity :data:`natgrad.distributed.LOCAL` in one
        process), so no step asks whether the run is distributed."""
        return nd.Reducer() if self.enabled else nd.LOCAL

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_env(cls, device: torch.device | str = "cpu") -> DataParallel:
        """Join the run torchrun started (``WORLD_SIZE > 1``), else :data:`SINGLE_PROCESS`.

        Initialises the default process group (gloo on CPU, ``cpu:gloo,cuda:nccl`` on CUDA)
        with the :data:`TIMEOUT_ENV` timeout, unless one exists already (then it is used and
        left alone).
        """
        owns = nd.init_from_env(device, timeout=timeout_from_env())
        if not nd.is_distributed():
            if owns:  # WORLD_SIZE > 1 yet a one-rank group: nothing to share
                dist.destroy_process_group()
            return SINGLE_PROCESS
        return cls(
            rank=nd.get_rank(),
            world_size=nd.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", nd.get_rank())),
            owns_group=owns,
        )

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` created it (safe after a failure)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``."""
        device = torch.device(device)
        if self.enabled and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (e.g. the resolved config, whose run name holds a timestamp)."""
        return nd.broadcast_object(obj) if self.enabled else obj

    def num_updates(self, total_steps: int, batch_size: int) -> int:
        """Updates to reach ``total_steps`` env steps summed over ranks:
        ``ceil(total_steps / (world_size · batch_size))``."""
        return -(-total_steps // (self.world_size * batch_size))

    # ----------------------------------------------------------------- seeding
    def env_seed(self, seed: int) -> int:
        """The env reset seed of this rank: ``seed + rank · RANK_SEED_STRIDE``."""
        return seed + self.rank * RANK_SEED_STRIDE

    def reseed(self, seed: int, update: int, *generators: torch.Generator) -> None:
        """Seed ``generators`` from ``(seed, rank, update)`` (no-op in one process).

        Called at the start of every update of a distributed run, so each rank's action
        noise, Fisher subsample and critic shuffles differ from the other ranks' and a
        resumed run draws exactly what the uninterrupted one drew, with no per-rank RNG
        state in the checkpoint. (A single process keeps its generators running and saves
        their state instead, as before.)
        """
        if not self.enabled:
            return
        states = np.random.SeedSequence([seed, self.rank, update]).generate_state(
            len(generators), dtype=np.uint64
        )
        for g, s in zip(generators, states):
            g.manual_seed(int(s))

    # ------------------------------------------------------------- statistics
    def synced_statistics(
        self, obs_rms: RunningMeanStd | None, reward_scaler: RewardScaler | None
    ) -> tuple[RunningMeanStd | None, RewardScaler | None]:
        """Make the observation statistics and the return statistics of the reward scaler
        global (:class:`SyncedRunningMeanStd`); each rank keeps its own running returns."""
        if not self.enabled:
            return obs_rms, reward_scaler
        if obs_rms is not None:
            obs_rms = SyncedRunningMeanStd(obs_rms)
        if reward_scaler is not None:
            reward_scaler.return_rms = SyncedRunningMeanStd(reward_scaler.return_rms)
        return obs_rms, reward_scaler

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's ``(n_r, ...)`` rows, concatenated in rank order (episode statistics)."""
        return nd.all_gather_rows(x) if self.enabled else x

    # ------------------------------------------------------------- parameters
    def broadcast_modules(self, *modules: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's modules."""
        if self.enabled:
            for module in modules:
                nd.broadcast_tensors(module)

    def check_agreement(
        self,
        actor: nn.Module,
        critic: nn.Module,
        optimizer: torch.optim.Optimizer | Adam | None = None,
        obs_rms: RunningMeanStd | None = None,
        reward_scaler: RewardScaler | None = None,
    ) -> None:
        """Fail on every rank if the shared state differs between ranks (one all-gather).

        Checked: actor and critic parameters, the critic optimiser's state tensors and the
        normaliser statistics (not the per-rank running returns of the reward scaler).

        Raises:
            natgrad.distributed.DivergenceError: naming the ranks that differ from rank 0.
        """
        if not self.enabled:
            return
        tensors: list[Tensor] = [*actor.parameters(), *critic.parameters()]
        if optimizer is not None:
            tensors += _state_tensors(optimizer.state_dict()["state"])
        for rms in (obs_rms, reward_scaler.return_rms if reward_scaler is not None else None):
            if rms is not None:
                tensors += [rms.count, rms.mean, rms.var]
        nd.check_agreement(tensors, what="actor, critic, optimiser or normaliser state")


def _state_tensors(state: Any) -> list[Tensor]:
    """Floating tensors of a (nested) optimiser state, in a deterministic order."""
    if isinstance(state, Tensor):
        return [state] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _state_tensors(state[k])]
    if isinstance(state, Iterable) and not isinstance(state, (str, bytes)):
        return [t for item in state for t in _state_tensors(item)]
    return []


SINGLE_PROCESS = DataParallel()
"""The one-process :class:`DataParallel` (every collective is the identity)."""
