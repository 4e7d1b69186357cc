"""Refuse a batch that would not fit in memory, rather than be killed by the OS mid-run.

:func:`estimate_rollout_bytes` is a conservative estimate of one rollout and one update
(buffers, activations, and the networks' weights, gradients and optimiser state);
:func:`check_memory` compares it with a budget: ``memory_limit_gb`` if set, else the host's
available memory (the least of ``/proc/meminfo``'s ``MemAvailable`` and a cgroup limit) and,
for a CUDA device, the GPU's free memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from trpo.config import TRPOConfig

__all__ = [
    "MemoryBudgetError",
    "available_memory_bytes",
    "check_memory",
    "estimate_rollout_bytes",
    "mlp_parameter_count",
]

_GIB = 2**30
# (limit, usage) files of cgroup v2 and v1; v1 reports "no limit" as a huge number.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


class MemoryBudgetError(ValueError):
    """The rollout/update buffers of a config would not fit in the available memory."""


def mlp_parameter_count(sizes: tuple[int, ...] | list[int]) -> int:
    """Weights and biases of an MLP with layer widths ``sizes = (n_0, ..., n_L)``:
    ``Σ_l (n_l + 1) · n_{l+1}``."""
    return sum((n_in + 1) * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def estimate_rollout_bytes(config: TRPOConfig, obs_dim: int, act_dim: int) -> int:
    """Conservative estimate of the memory one rollout and one update need, in bytes.

    With ``B = n_envs·n_steps``, ``b`` the dtype's bytes, ``W_a = obs_dim + Σhidden + act_dim``
    and ``W_c = obs_dim + Σhidden + 1`` (actor and critic widths), ``B_f = ceil(fvp_fraction·B)``
    and ``P_a``, ``P_c`` the parameters of the actor (its MLP plus ``act_dim`` for a Gaussian's
    log σ) and of the critic (:func:`mlp_parameter_count`)::

        rollout = B · (2·obs_dim + 3·act_dim + 8) · b
            # obs, true next obs, action, π_old's parameters (≤ 2·act_dim), and 8 scalars:
            # log-prob, reward, termination, truncation, value, next value, advantage, return
        update  = (2·B·W_a + 4·B_f·W_a + 2·B·W_c) · b
            # activations (pre/post) kept for the surrogate gradient (B states), the Fisher
            # linearisation plus its tangents (B_f states) and the critic's values (B states)
        params  = (9·P_a + 7·P_c) · b
            # actor: weights, gradient, 4 CG vectors (x, r, p, Fp), the step, the line
            # search's candidate and the pre-update copy; critic: weights, gradient, Adam's
            # two moments and the pre-update copies of weights and moments
        total   = 1.5 · (rollout + update + params)      # allocator slack and temporaries

    Args:
        config: the run's config.
        obs_dim: flattened observation size.
        act_dim: distribution parameters per state: K logits for Discrete(K), d for a
            d-dimensional Box (mean; log σ is state-independent), Σ K_i for MultiDiscrete.

    Returns:
        The estimate in bytes (an int).

    Raises:
        ValueError: ``obs_dim`` or ``act_dim`` is not a positive int.
    """
    for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (got {v!r})")
    b = 4 if config.dtype == "float32" else 8
    batch = config.batch_size
    fvp_batch = math.ceil(config.fvp_fraction * batch)
    hidden = sum(config.hidden_sizes)
    w_actor = obs_dim + hidden + act_dim
    w_critic = obs_dim + hidden + 1
    rollout = batch * (2 * obs_dim + 3 * act_dim + 8) * b
    update = (2 * batch * w_actor + 4 * fvp_batch * w_actor + 2 * batch * w_critic) * b
    p_actor = mlp_parameter_count((obs_dim, *config.hidden_sizes, act_dim)) + act_dim
    p_critic = mlp_parameter_count((obs_dim, *config.hidden_sizes, 1))
    params = (9 * p_actor + 7 * p_critic) * b
    return math.ceil(1.5 * (rollout + update + params))


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: the free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
            if limit != "max" and int(limit) < 2**60:
                return max(int(limit) - usage, 0)
        except (OSError, ValueError):
            pass
    return None


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the least of the OS's available memory and any
    cgroup (container) limit; None when neither can be determined."""
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def _budgets(config: TRPOConfig) -> list[tuple[int, str]]:
    """``(bytes, what)`` of every known budget of ``config`` (none: the check passes)."""
    if config.memory_limit_gb is not None:
        return [(int(config.memory_limit_gb * _GIB), "memory_limit_gb")]
    budgets = []
    host = available_memory_bytes()
    if host is not None:
        budgets.append((host, "available host memory"))
    if config.device.startswith("cuda") or config.device == "auto":
        try:
            if torch.cuda.is_available():
                dev = config.torch_device()
                budgets.append((torch.cuda.mem_get_info(dev)[0], f"free memory on {dev}"))
        except Exception:  # a broken CUDA setup is reported when the device is used
            pass
    return budgets


def check_memory(
    config: TRPOConfig, obs_dim: int, act_dim: int, *, available_bytes: int | None = None
) -> int:
    """Refuse a batch configuration whose buffers would not fit in memory.

    The budget is ``available_bytes`` if given, else ``config.memory_limit_gb`` if set, else
    :func:`available_memory_bytes` (and, for a CUDA device, the GPU's free memory too).
    Without any known budget the check passes.

    Returns:
        The estimate of :func:`estimate_rollout_bytes`, in bytes.

    Raises:
        MemoryBudgetError: (a ``ValueError``) with the estimate, the budget and what to lower.
    """
    need = estimate_rollout_bytes(config, obs_dim, act_dim)
    budgets = (
        [(int(available_bytes), "the given budget")]
        if available_bytes is not None
        else _budgets(config)
    )
    for budget, what in budgets:
        if need > budget:
            raise MemoryBudgetError(
                f"a batch of n_envs × n_steps = {config.n_envs} × {config.n_steps} = "
                f"{config.batch_size} transitions (obs_dim {obs_dim}, act_dim {act_dim}, "
                f"{config.dtype}) and networks of hidden_sizes {config.hidden_sizes} (weights, "
                f"gradients, optimiser state) needs about {need / _GIB:.2f} GiB, more than "
                f"{what} ({budget / _GIB:.2f} GiB); lower n_envs or n_steps (or fvp_fraction) "
                "or hidden_sizes, or raise memory_limit_gb"
            )
    return need
