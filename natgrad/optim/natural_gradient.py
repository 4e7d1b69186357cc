"""Natural-gradient descent for supervised models (Amari 1998; TRPO's step, Schulman 2015).

With ``g = ∇f(θ)`` and the Fisher ``F`` of the model's output distribution on the
curvature batch (:func:`natgrad.fisher_operator` for a declared family, or the empirical
Fisher ``(1/B) Σ ∇ℓ_i ∇ℓ_iᵀ`` of the per-sample losses):

* fixed learning rate: ``s = cg_solve(F + λI, g)``, ``θ ← θ − lr·s``;
* KL trust region (``max_kl = δ``): :func:`natgrad.natural_step` gives
  ``Δθ = −sqrt(2δ / sᵀ(F + λI)s) · s`` (so ``½ΔθᵀFΔθ = δ``), then
  :func:`natgrad.line_search` backtracks ``θ + 0.8ᵏΔθ`` until the loss decreases and the
  true mean KL ``E_x[KL(p_θ(·|x) ‖ p_θ'(·|x))] ≤ δ`` — TRPO's update, for a loss instead of
  a surrogate.

Why the radius adapts: TRPO draws a new batch every update, so a rejected step is simply
skipped. A full-batch optimizer would instead repeat the same rejected step forever — and it
happens: near a minimum of a classification loss the predictions become confident, the Fisher
``p(1−p)`` vanishes, and a step of KL ``δ`` overshoots even after every backtrack. So ``δ`` is
the *largest* radius: the current radius ``δ_k`` (in ``state["radius"]``) is quartered after a
rejected step and doubled, up to ``δ``, after a full step ``θ + Δθ`` is accepted at once
(Nocedal & Wright's Alg. 4.1 rule, with the backtracking line search as the reduction test).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.cg import CG
from natgrad.families import kl_divergence
from natgrad.optim._base import (
    Closure,
    ModelView,
    check_closure,
    check_family,
    check_nonneg,
    group_scale,
)
from natgrad.trust_region import line_search, natural_step

__all__ = ["NaturalGradient", "mean_kl"]


def mean_kl(family: str, old: Any, new: Any) -> Tensor:
    """``E_x[KL(p_old(·|x) ‖ p_new(·|x))]`` over the batch, in closed form for the families of
    :func:`natgrad.fisher_operator` (:func:`natgrad.families.kl_divergence`)."""
    return kl_divergence(family, old, new).mean()


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent on ``torch.optim`` (formulas in the module docstring).

    Args:
        params: Parameters or param groups of ``model`` (groups may differ in ``lr``).
        model: The module the closure evaluates.
        family: The model's output family, one of :data:`natgrad.FAMILIES`, or
            ``"empirical"`` (then the closure returns the per-sample losses ``(B,)``).
        lr: Step size of the fixed-learning-rate update (ignored with ``max_kl``).
        max_kl: If given, the largest KL trust-region radius ``δ > 0`` (needs a declared
            family); the radius in use adapts below it (module docstring).
        damping: ``λ ≥ 0`` added to ``F``.
        cg_maxiter: CG iterations (default 10, as TRPO).
        cg_rtol: CG relative tolerance.
        max_backtracks: Line-search candidates with ``max_kl``.

    Raises:
        ValueError: unknown ``family``; ``max_kl`` with ``"empirical"``; negative
            ``damping``; non-positive ``lr`` or ``max_kl``.
    """

    def __init__(
        self,
        params: Any,
        model: nn.Module,
        *,
        family: str,
        lr: float = 1.0,
        max_kl: float | None = None,
        damping: float = 1e-3,
        cg_maxiter: int = 10,
        cg_rtol: float = 1e-10,
        max_backtracks: int = 10,
    ) -> None:
        check_family(family)
        check_nonneg("lr", lr, positive=True)
        check_nonneg("damping", damping)
        if max_kl is not None:
            check_nonneg("max_kl", max_kl, positive=True)
            if family == "empirical":
                raise ValueError("max_kl needs a declared output family, not 'empirical'")
        defaults = dict(lr=float(lr), damping=float(damping), cg_maxiter=int(cg_maxiter),
                        cg_rtol=check_nonneg("cg_rtol", cg_rtol))
        super().__init__(params, defaults)
        self._view = ModelView(model, [p for g in self.param_groups for p in g["params"]])
        self._family, self._max_kl, self._tries = family, max_kl, int(max_backtracks)

    @torch.no_grad()
    def step(self, closure: Closure, inputs: Any = None) -> Tensor:  # type: ignore[override]
        """One natural-gradient step; returns the loss before the step.

        Args:
            closure: ``() -> loss`` (per-sample losses for ``family="empirical"``).
            inputs: Model inputs of the curvature batch (not needed for ``"empirical"``).
        """
        closure = check_closure(closure)
        view, opts = self._view, self.param_groups[0]
        empirical = self._family == "empirical"
        theta = view.flat()
        with torch.enable_grad():
            f0, g = view.value_grad(closure, theta, "mean" if empirical else "scalar")
            F = view.curvature("empirical" if empirical else "fisher", theta, closure=closure,
                               inputs=inputs, family=self._family)
        solver = CG(maxiter=opts["cg_maxiter"], rtol=opts["cg_rtol"], check_finite=False)
        state = self.state[view.params[0]]
        if self._max_kl is None:
            s = solver.solve(F, g, damping=opts["damping"]).x
            view.write(theta - group_scale(self.param_groups, view) * s)
            state.update(step=state.get("step", 0) + 1)
            return f0.detach()
        radius = state.get("radius", self._max_kl)
        nat = natural_step(-g, F, radius, damping=opts["damping"], solver=solver)
        old = F.outputs
        outputs_fn, inputs_t = view.outputs_fn(), _as_tuple(inputs)

        def kl(t: Tensor) -> Tensor:
            return mean_kl(self._family, old, outputs_fn(view.as_dict(t), *inputs_t))

        ls = line_search(
            lambda t: -view.value(closure, t), kl, theta, nat.step,
            expected_improvement=nat.expected_improvement, objective_old=-f0,
            max_tries=self._tries, delta=radius,
        )
        view.write(ls.theta)
        accepted = bool(ls.accepted)
        state.update(step=state.get("step", 0) + 1, accepted=accepted, kl=float(ls.constraint),
                     step_status=nat.status.value,
                     radius=_next_radius(radius, self._max_kl, accepted, int(ls.tries)))
        return f0.detach()


def _next_radius(radius: float, max_kl: float, accepted: bool, tries: int) -> float:
    """Quarter the KL radius after a rejected step; double it, up to ``max_kl``, after a full
    step was accepted at the first try (module docstring)."""
    if not accepted:
        return radius / 4.0
    return min(2.0 * radius, max_kl) if tries == 1 else radius


def _as_tuple(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, Sequence) and not isinstance(inputs, Tensor) else (
        inputs,
    )
