"""Hessian-free optimisation (Martens, "Deep learning via Hessian-free optimization", 2010).

One :meth:`HessianFree.step` at ``θ`` with ``g = ∇f(θ)`` on the minibatch and the
curvature ``G`` (GGN or Fisher, :func:`natgrad.ggn_operator` / :func:`natgrad.fisher_operator`,
on the curvature batch given to ``step``)::

    p   ≈ argmin q(p) = gᵀp + ½ pᵀ(G + λI)p    cg_solve from p₀ = decay·p_prev  (§4.5, §4.2)
    p_i = CG iterates kept at i = ⌈1.3ʲ⌉ and the last one; going back from the last,
          take the one with the lowest f(θ + p_i) (CG-iterate backtracking, §4.6)
    ρ   = (f(θ + p) − f(θ)) / (q(p) − ½λ‖p‖²)     (the undamped model, so that ρ = 1 on a
          quadratic; q(p) = ½(gᵀp − pᵀr), r the CG residual: no extra G·v)
    λ  ← boost·λ if ρ < 1/4,  drop·λ if ρ > 3/4                     (Levenberg–Marquardt, §4.1)
    α   = the first of 1, 0.8, 0.8², … with f(θ + αp) ≤ f(θ) + 10⁻² α gᵀp     (line search)
    θ  ← θ + lr·α·p

The CG stopping rule is cg_solve's ``‖r‖ ≤ rtol·‖g‖`` or ``cg_maxiter`` iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.cg import CGIterate, cg_solve
from natgrad.optim._base import (
    Closure,
    ModelView,
    check_closure,
    check_family,
    check_nonneg,
    group_scale,
)

__all__ = ["HessianFree"]

_ARMIJO_C = 1e-2
_LS_SHRINK = 0.8
_LS_TRIES = 20


class HessianFree(torch.optim.Optimizer):
    """Martens' Hessian-free optimizer on ``torch.optim`` (formulas in the module docstring).

    Args:
        params: Parameters or param groups of ``model`` (groups may differ only in ``lr``:
            one CG solve covers all parameters).
        model: The module the closure evaluates (see :mod:`natgrad.optim` for the closure
            contract).
        lr: Scale of the accepted step (default 1, Martens' choice).
        curvature: ``"ggn"`` (default) or ``"fisher"``.
        loss: For ``"ggn"``: ``"cross_entropy"`` (default), ``"mse"`` or a callable
            ``(outputs, t) -> H_out t`` (see :func:`natgrad.ggn_operator`).
        family: For ``"fisher"``: the output family (see :func:`natgrad.fisher_operator`).
        damping: Initial ``λ > 0``.
        boost, drop: LM factors (``boost > 1 > drop > 0``; Martens: 3/2 and 2/3).
        cg_maxiter: CG iteration limit per step.
        cg_rtol: CG relative tolerance ``‖r‖ ≤ cg_rtol·‖g‖``.
        decay: Warm-start factor ``p₀ = decay·p_prev`` in ``[0, 1]`` (Martens: 0.95).
        preconditioner: Optional ``r -> M⁻¹ r`` on flat vectors, given to cg_solve.

    Raises:
        ValueError: a negative/zero ``damping``, bad LM factors, ``decay`` outside
            ``[0, 1]``, an unknown ``curvature``/``family``.
    """

    def __init__(
        self,
        params: Any,
        model: nn.Module,
        *,
        lr: float = 1.0,
        curvature: str = "ggn",
        loss: str | Callable[[Any, Any], Any] = "cross_entropy",
        family: str | None = None,
        damping: float = 1.0,
        boost: float = 1.5,
        drop: float = 2.0 / 3.0,
        cg_maxiter: int = 100,
        cg_rtol: float = 1e-4,
        decay: float = 0.95,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_nonneg("lr", lr, positive=True)
        check_nonneg("damping", damping, positive=True)
        if not (float(boost) > 1.0 and 0.0 < float(drop) < 1.0):
            raise ValueError(f"boost must be > 1 and drop in (0, 1), got {boost}, {drop}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if curvature not in ("ggn", "fisher"):
            raise ValueError(f"curvature must be 'ggn' or 'fisher', got {curvature!r}")
        if curvature == "fisher" and (family is None or family == "empirical"):
            raise ValueError("curvature='fisher' needs a declared output family=")
        check_family(family)
        defaults = dict(
            lr=float(lr), damping=float(damping), boost=float(boost), drop=float(drop),
            cg_maxiter=int(cg_maxiter), cg_rtol=check_nonneg("cg_rtol", cg_rtol),
            decay=float(decay),
        )
        super().__init__(params, defaults)
        self._view = ModelView(model, [p for g in self.param_groups for p in g["params"]])
        self._curvature, self._loss, self._family = curvature, loss, family
        self._preconditioner = preconditioner

    def _settings(self) -> dict:
        keys = ("boost", "drop", "cg_maxiter", "cg_rtol", "decay")
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            if any(group[k] != first[k] for k in keys):
                raise ValueError(f"param groups may differ only in lr; {keys} are shared")
        return first

    @torch.no_grad()
    def step(self, closure: Closure, inputs: Any = None) -> Tensor:  # type: ignore[override]
        """One Hessian-free step; returns the loss before the step.

        Args:
            closure: ``() -> loss`` (the closure contract of :mod:`natgrad.optim`).
            inputs: Model inputs of the curvature batch (a tensor or a tuple).
        """
        closure = check_closure(closure)
        opts, view = self._settings(), self._view
        state = self.state[view.params[0]]
        damping = float(state.get("damping", opts["damping"]))
        theta = view.flat()
        with torch.enable_grad():
            f0, g = view.value_grad(closure, theta)
            G = view.curvature(self._curvature, theta, inputs=inputs, loss=self._loss,
                               family=self._family)
        prev = state.get("direction")
        kept = _Iterates(opts["cg_maxiter"])
        cg = cg_solve(
            G, -g, x0=None if prev is None else opts["decay"] * prev, damping=damping,
            rtol=opts["cg_rtol"], maxiter=opts["cg_maxiter"], M=self._preconditioner,
            callback=kept, check_finite=False,
        )
        p, r, f_p = kept.backtrack(lambda q: float(view.value(closure, theta + q)), cg.x,
                                   cg.residual)
        f0_ = float(f0)
        # The undamped model gᵀp + ½pᵀGp: ρ measures how well G predicts f.
        model_decrease = 0.5 * float(g @ p - p @ r) - 0.5 * damping * float(p @ p)
        rho = (f_p - f0_) / model_decrease if model_decrease < 0 else -math.inf
        if rho < 0.25:
            damping *= opts["boost"]
        elif rho > 0.75:
            damping *= opts["drop"]
        alpha = _armijo(lambda a: float(view.value(closure, theta + a * p)), f0_,
                        float(g @ p), f_p)
        if alpha > 0:
            view.write(theta + alpha * group_scale(self.param_groups, view) * p)
        state.update(
            damping=damping, direction=cg.x.detach(), step=state.get("step", 0) + 1, rho=rho,
            alpha=alpha, cg_iterations=int(cg.iterations),
        )
        return f0.detach()


class _Iterates:
    """cg_solve callback keeping the iterates at ``i = ⌈1.3ʲ⌉`` (Martens §4.6)."""

    def __init__(self, maxiter: int) -> None:
        marks, j = set(), 0
        while math.ceil(1.3**j) <= maxiter:
            marks.add(math.ceil(1.3**j))
            j += 1
        self.marks = marks
        self.kept: list[tuple[Tensor, Tensor]] = []

    def __call__(self, it: CGIterate) -> None:
        if it.iteration in self.marks:
            self.kept.append((it.x.clone(), it.residual.clone()))

    def backtrack(
        self, f: Callable[[Tensor], float], x: Tensor, r: Tensor
    ) -> tuple[Tensor, Tensor, float]:
        """From the final iterate back through the kept ones while ``f`` decreases.

        Returns:
            The chosen iterate, its CG residual and its ``f``.
        """
        best, best_f = (x, r), f(x)
        for cand in reversed(self.kept):
            if torch.equal(cand[0], best[0]):
                continue
            fc = f(cand[0])
            if not fc < best_f:
                break
            best, best_f = cand, fc
        return best[0], best[1], best_f


def _armijo(f: Callable[[float], float], f0: float, slope: float, f1: float) -> float:
    """First ``α = 0.8ᵏ`` with ``f(α) ≤ f0 + c·α·slope`` (``f(1) = f1`` known); 0 if none."""
    if not slope < 0:
        return 0.0
    alpha, fa = 1.0, f1
    for _ in range(_LS_TRIES):
        if fa <= f0 + _ARMIJO_C * alpha * slope:
            return alpha
        alpha *= _LS_SHRINK
        fa = f(alpha)
    return 0.0
