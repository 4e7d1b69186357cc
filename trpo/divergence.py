"""Notice a diverging critic (e.g. a far too large ``critic_lr``) before it overflows.

V(s) estimates a discounted return ``Σ_k γᵏ r_{t+k}``, so with every reward bounded by
``r_max`` a sound critic stays within ``r_max / (1 − γ)`` (for γ = 1: ``r_max`` times the
steps taken per env so far). :class:`CriticWatch` keeps the largest ``|r|`` seen so far
and, each update, compares the critic's scale — the largest ``|V(s)|`` of the rollout
(the critic after the previous fit) and the fit's RMS error ``√value_loss`` — with that
bound::

    diverging  ⇔  scale > FACTOR · max(r_max · horizon, 1)

(the floor of 1 keeps a freshly initialised critic, whose outputs are O(1), from being
flagged while the rewards seen are still ~0). After ``PATIENCE`` diverging updates in a
row it returns a warning, once per run. A critic that overflows is not this module's
business: its non-finite update is rejected by ``train`` like any other.
"""

from __future__ import annotations

import math

import torch

from trpo.rollout import Rollout

__all__ = ["FACTOR", "PATIENCE", "CriticWatch"]

FACTOR = 100.0
"""How far beyond the bound the critic's scale must be to count as diverging."""
PATIENCE = 2
"""Diverging updates in a row before the warning."""


class CriticWatch:
    """Tracks the reward scale over a run and warns once when the critic diverges.

    Args:
        gamma: The discount γ ∈ (0, 1].
        critic_lr: The critic's learning rate (named in the warning).
    """

    def __init__(self, gamma: float, critic_lr: float) -> None:
        self.gamma, self.critic_lr = gamma, critic_lr
        self.max_abs_reward = 0.0
        self.steps_per_env = 0
        self.in_a_row = 0
        self.warned = False

    def bound(self) -> float:
        """``max(r_max · horizon, 1)``: the largest plausible |V| given the rewards so far."""
        horizon = 1.0 / (1.0 - self.gamma) if self.gamma < 1.0 else float(self.steps_per_env)
        return max(self.max_abs_reward * horizon, 1.0)

    def observe(self, rollout: Rollout, value_loss: float) -> str | None:
        """Account for one update; return the warning (once) when the critic is diverging.

        Args:
            rollout: The update's rollout: its rewards and the critic's values ``V(s_t)``.
            value_loss: The critic fit's mean squared error (NaN/inf when it failed).
        """
        rewards = rollout.rewards.detach().abs()
        if rewards.numel():
            self.max_abs_reward = max(self.max_abs_reward, float(rewards.max()))
        self.steps_per_env += int(rollout.rewards.shape[0])
        values = rollout.values.detach().abs()
        # NaN compares False with everything: a non-finite value counts as infinitely large.
        scale = float(values.max()) if bool(torch.isfinite(values).all()) else math.inf
        if math.isfinite(value_loss) and value_loss >= 0:
            scale = max(scale, math.sqrt(value_loss))
        bound = self.bound()
        self.in_a_row = self.in_a_row + 1 if scale > FACTOR * bound else 0
        if self.in_a_row < PATIENCE or self.warned:
            return None
        self.warned = True
        return (
            f"the critic is diverging: its values or errors reach {scale:.3g}, while rewards "
            f"up to |r| = {self.max_abs_reward:.3g} (γ = {self.gamma:g}) bound a return by "
            f"{bound:.3g}. Lower critic_lr (now {self.critic_lr:g}) or critic_epochs, or set "
            "normalize_reward. (Warned once; an update whose critic overflows is rejected.)"
        )
