"""Running observation normalisation and reward scaling.

:class:`RunningMeanStd` keeps ``(count, mean, var)`` of everything it has seen in
float64 and merges a new batch with Chan et al.'s parallel update (exact, in any
order of batches, so statistics from several ranks merge the same way):

    δ = μ_b − μ,  n' = n + n_b,  μ' = μ + δ n_b / n',
    σ'² = (n σ² + n_b σ_b² + δ² n n_b / n') / n'            (population variances)

:class:`RewardScaler` divides rewards by the running standard deviation of the
discounted return ``R_t = γ R_{t−1} + r_t`` (reset to 0 after an episode ends),
as SB3's ``VecNormalize`` and gymnasium's ``NormalizeReward`` do; rewards are
not centred, so their sign and the optimal policy are unchanged.

Both have a ``frozen`` flag (for evaluation: statistics are used, never updated)
and ``state_dict()`` / ``load_state_dict()`` of plain tensors, so checkpoints load
with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["RewardScaler", "RunningMeanStd"]


def _as_float64(x: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


class RunningMeanStd:
    """Running mean and (population) variance of a stream of arrays of shape ``shape``.

    Starts at ``count = 0, mean = 0, var = 1``, so that :meth:`normalize` is the identity (up
    to clipping) until the first :meth:`update`.

    Args:
        shape: Shape of one sample (``()`` for scalars).
        epsilon: Added to the variance in :meth:`normalize`.
        clip: Normalised values are clipped to ``[−clip, clip]`` (``None``: no clipping).
        frozen: If true, :meth:`update` does nothing (evaluation mode); may be set at any time.
        raw: Optional bool mask of shape ``shape``: those elements pass :meth:`normalize`
            unchanged and unclipped (the pixels of an image part, which the CNN scales itself).

    Attributes:
        count, mean, var: float64 tensors of shapes ``()``, ``shape``, ``shape``.
    """

    def __init__(
        self,
        shape: Sequence[int] = (),
        *,
        epsilon: float = 1e-8,
        clip: float | None = 10.0,
        frozen: bool = False,
        raw: Tensor | None = None,
    ):
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        self.shape = tuple(int(s) for s in shape)
        self.epsilon, self.clip, self.frozen = float(epsilon), clip, bool(frozen)
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(self.shape, dtype=torch.float64)
        self.var = torch.ones(self.shape, dtype=torch.float64)
        self.raw = raw
        # (mean, 1/std) cast per (dtype, device); cleared whenever the statistics change.
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def update(self, x: Tensor | np.ndarray) -> None:
        """Merge a batch ``x`` of shape ``(B, *shape)`` (no-op when frozen or ``B = 0``).

        Raises:
            ValueError: If ``x`` has the wrong shape or is not finite.
        """
        x = _as_float64(x)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, *{self.shape}), got {tuple(x.shape)}")
        if self.frozen or x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("x contains non-finite values; refusing to update the statistics")
        self.update_from_moments(x.mean(0), x.var(0, correction=0), x.shape[0])

    def update_from_moments(
        self, batch_mean: Tensor, batch_var: Tensor, batch_count: float | Tensor
    ) -> None:
        """Merge a batch given by its mean, population variance and count (Chan et al.'s
        update in the module docstring; no-op when frozen or the count is 0)."""
        if self.frozen:
            return
        batch_mean, batch_var = _as_float64(batch_mean), _as_float64(batch_var)
        batch_count = _as_float64(batch_count)
        if batch_count < 0:
            raise ValueError(f"batch_count must be >= 0, got {float(batch_count)}")
        if batch_count == 0:
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count
        self.var = (m2 + delta**2 * self.count * batch_count / total) / total
        self.mean = self.mean + delta * (batch_count / total)
        self.count = total
        self._cache.clear()

    @property
    def std(self) -> Tensor:
        """``sqrt(var + epsilon)``, the scale :meth:`normalize` divides by."""
        return torch.sqrt(self.var + self.epsilon)

    def normalize(self, x: Tensor) -> Tensor:
        """``clamp((x − mean) · (1/sqrt(var + ε)), −clip, clip)`` in the dtype and device of
        ``x`` (``(*B, *shape)``; integer inputs give float32), same shape.

        Both factors are cast once to ``x``'s dtype, so a row gives the same result alone or
        in a batch (the rollout relies on it).
        """
        if not x.is_floating_point():
            x = x.to(torch.float32)
        key = (x.dtype, x.device)
        if key not in self._cache:
            # Built outside inference mode, so that the cached factors are ordinary tensors
            # usable under autograd too (this runs once per env step: cast once, not per call).
            with torch.inference_mode(False):
                self._cache[key] = tuple(
                    f.to(dtype=x.dtype, device=x.device) for f in self._factors()
                )
        mean, inv_std, low, high = self._cache[key]
        out = (x - mean) * inv_std
        return out.clamp_(low, high) if self.clip is not None else out

    def _factors(self) -> tuple[Tensor, ...]:
        """``(mean, 1/std, low, high)`` of :meth:`normalize` in float64, identity where ``raw``."""
        mean, inv_std = self.mean, 1.0 / self.std
        clip = math.inf if self.clip is None else self.clip
        low, high = (torch.full(self.shape, c, dtype=torch.float64) for c in (-clip, clip))
        if self.raw is not None:
            mean, inv_std = mean.masked_fill(self.raw, 0), inv_std.masked_fill(self.raw, 1)
            low, high = low.masked_fill(self.raw, -math.inf), high.masked_fill(self.raw, math.inf)
        return mean, inv_std, low, high

    def numpy_normalizer(self, dtype: np.dtype | type) -> Callable[[np.ndarray], np.ndarray]:
        """:meth:`normalize` for numpy arrays of ``dtype`` with the *current* statistics
        (identical results for the same dtype); build a new one after an update."""
        mean, inv_std, low, high = (f.numpy().astype(dtype) for f in self._factors())
        clip = self.clip

        def normalize(x: np.ndarray) -> np.ndarray:
            out = (x - mean) * inv_std
            if clip is not None:
                # maximum/minimum: np.clip's Python-level wrapper costs more than the op.
                np.minimum(np.maximum(out, low, out=out), high, out=out)
            return out

        return normalize

    def state_dict(self) -> dict[str, Tensor]:
        """``{"count", "mean", "var"}`` as float64 tensors (``weights_only``-loadable)."""
        return {"count": self.count.clone(), "mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` (allowed even when frozen).

        Raises:
            ValueError: If keys or shapes do not match.
        """
        missing = {"count", "mean", "var"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        mean, var, count = (_as_float64(state[k]).clone() for k in ("mean", "var", "count"))
        if tuple(mean.shape) != self.shape or tuple(var.shape) != self.shape or count.ndim != 0:
            raise ValueError(
                f"state shapes do not match: mean {tuple(mean.shape)}, var {tuple(var.shape)}, "
                f"count {tuple(count.shape)}, expected {self.shape} and ()"
            )
        self.count, self.mean, self.var = count, mean, var
        self._cache.clear()


class RewardScaler:
    """Scale rewards by the running std of the discounted return (not centred).

    For each env, ``R_t = γ R_{t−1} + r_t`` with ``R`` reset to 0 after a step
    whose ``done`` (termination or truncation) is true; the variance of all
    ``R_t`` seen so far is tracked by a :class:`RunningMeanStd`, and the scaled
    reward is ``r_t / sqrt(var(R) + ε)`` (optionally clipped to ``±clip``).

    A rollout is scaled in one call (:meth:`scale` on ``(T, N)``): the statistics
    are updated with the ``T·N`` returns first, then every reward of the rollout
    is divided by the same std, so one batch uses one scale.

    Args:
        gamma: Discount of the return (use the agent's γ).
        n_envs: Number of parallel envs ``N``.
        epsilon: Added to the variance.
        clip: Scaled rewards are clipped to ``[−clip, clip]`` (``None``: no clipping).
        frozen: If true, neither the return accumulator nor the statistics change.
    """

    def __init__(
        self,
        gamma: float,
        n_envs: int,
        *,
        epsilon: float = 1e-8,
        clip: float | None = None,
        frozen: bool = False,
    ):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if n_envs <= 0:
            raise ValueError(f"n_envs must be positive, got {n_envs}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        self.gamma = float(gamma)
        self.n_envs = int(n_envs)
        self.clip = clip
        self.frozen = bool(frozen)
        self.return_rms = RunningMeanStd((), epsilon=epsilon, clip=None)
        self.returns = np.zeros(self.n_envs, dtype=np.float64)

    def scale(self, rewards: Tensor, dones: Tensor) -> Tensor:
        """Scale a ``(T, N)`` block of rewards (or one ``(N,)`` step).

        Args:
            rewards: ``(T, N)`` or ``(N,)`` raw rewards (finite).
            dones: Same shape, bool: the episode ended at that step (terminated or truncated).

        Returns:
            Scaled rewards, same shape, dtype and device as ``rewards``.
        """
        if rewards.shape != dones.shape or rewards.shape[-1] != self.n_envs or rewards.ndim > 2:
            raise ValueError(
                f"rewards and dones must both be (T, {self.n_envs}) or ({self.n_envs},), got "
                f"{tuple(rewards.shape)} and {tuple(dones.shape)}"
            )
        r = _as_float64(rewards).reshape(-1, self.n_envs).numpy()
        d = torch.as_tensor(dones).cpu().reshape(-1, self.n_envs).numpy().astype(bool)
        if not self.frozen:
            ret = self.returns.copy()
            seen = np.empty_like(r)
            # A short loop over time (N-wide numpy ops): the recurrence is sequential.
            for t in range(r.shape[0]):
                ret *= self.gamma
                ret += r[t]
                seen[t] = ret
                ret[d[t]] = 0.0
            self.returns = ret
            self.return_rms.update(seen.reshape(-1))
        out = rewards / self.return_rms.std.to(dtype=rewards.dtype, device=rewards.device)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Return-accumulator and statistics as plain tensors (``weights_only``-loadable)."""
        state = {f"return_{k}": v for k, v in self.return_rms.state_dict().items()}
        state["returns"] = torch.from_numpy(self.returns.copy())
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        if "returns" not in state:
            raise ValueError("state is missing key 'returns'")
        returns = _as_float64(state["returns"])
        if tuple(returns.shape) != (self.n_envs,):
            raise ValueError(
                f"state['returns'] must have shape ({self.n_envs},), got {tuple(returns.shape)}"
            )
        self.return_rms.load_state_dict(
            {k: state[f"return_{k}"] for k in ("count", "mean", "var") if f"return_{k}" in state}
        )
        self.returns = returns.numpy().copy()
