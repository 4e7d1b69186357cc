"""Trust-region Newton on ``torch.optim`` for full-batch problems.

One :meth:`TrustRegionNewton.step` is one iteration of :func:`natgrad.minimize`'s
``trust-ncg`` (Nocedal & Wright Alg. 4.1 with :func:`natgrad.steihaug_solve`) with the
exact Hessian of the closure's loss (double backprop) or the GGN of the model outputs::

    p = steihaug_solve(H, g, Δ, rtol=min(0.5, √‖g‖)),   ρ = (f(θ) − f(θ + p)) / −m(p)
    θ ← θ + p if ρ > η;   Δ updated by natgrad.minimize.update_radius
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad.minimize import reduction_ratio, update_radius
from natgrad.optim._base import Closure, ModelView, check_closure, check_nonneg
from natgrad.steihaug import steihaug_solve

__all__ = ["TrustRegionNewton"]


class TrustRegionNewton(torch.optim.Optimizer):
    """Trust-region Newton-CG (Steihaug) as a ``torch.optim`` optimizer.

    Args:
        params: Parameters (one param group; the trust region is over all of them).
        model: The module the closure evaluates.
        curvature: ``"hessian"`` (default: exact, indefinite allowed) or ``"ggn"``.
        loss: For ``"ggn"``: ``"cross_entropy"``, ``"mse"`` or a callable, as
            :func:`natgrad.ggn_operator`'s ``output_hessian``.
        radius: Initial trust radius ``Δ₀ > 0``.
        max_radius: ``Δ_max ≥ Δ₀``.
        eta: Acceptance threshold ``η ∈ [0, 1/4)``.
        cg_maxiter: Steihaug iteration limit per step.

    Raises:
        ValueError: non-positive or inconsistent radii, ``eta`` outside ``[0, 1/4)``,
            unknown ``curvature``, more than one param group.
    """

    def __init__(
        self,
        params: Any,
        model: nn.Module,
        *,
        curvature: str = "hessian",
        loss: str | Callable[[Any, Any], Any] = "cross_entropy",
        radius: float = 1.0,
        max_radius: float = 1000.0,
        eta: float = 0.15,
        cg_maxiter: int = 250,
    ) -> None:
        radius = check_nonneg("radius", radius, positive=True)
        if not check_nonneg("max_radius", max_radius, positive=True) >= radius:
            raise ValueError(f"max_radius ({max_radius}) must be >= radius ({radius})")
        if not 0.0 <= float(eta) < 0.25:
            raise ValueError(f"eta must be in [0, 0.25), got {eta}")
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        defaults = dict(radius=radius, max_radius=float(max_radius), eta=float(eta),
                        cg_maxiter=int(cg_maxiter))
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("TrustRegionNewton takes one param group (one trust region)")
        self._view = ModelView(model, list(self.param_groups[0]["params"]))
        self._curvature, self._loss = curvature, loss

    @torch.no_grad()
    def step(self, closure: Closure, inputs: Any = None) -> Tensor:  # type: ignore[override]
        """One trust-region iteration; returns the loss before the step.

        Args:
            closure: ``() -> loss`` on the full batch (the closure contract).
            inputs: Model inputs, only for ``curvature="ggn"``.
        """
        closure = check_closure(closure)
        view, opts = self._view, self.param_groups[0]
        state = self.state[view.params[0]]
        radius = float(state.get("radius", opts["radius"]))
        theta = view.flat()
        with torch.enable_grad():
            f0, g = view.value_grad(closure, theta)
            H = view.curvature(self._curvature, theta, closure=closure, inputs=inputs,
                               loss=self._loss)
        gnorm = float(g.norm())
        if not math.isfinite(gnorm):
            raise ValueError("the gradient of the closure's loss is not finite")
        if gnorm == 0.0:
            return f0.detach()
        sub = steihaug_solve(H, g, radius, rtol=min(0.5, math.sqrt(gnorm)),
                             maxiter=opts["cg_maxiter"], check_finite=False)
        predicted = -float(sub.model_value)
        f_try = float(view.value(closure, theta + sub.p)) if predicted > 0 else math.inf
        rho = reduction_ratio(float(f0), f_try, predicted, torch.finfo(theta.dtype).eps)
        if rho > opts["eta"]:
            view.write(theta + sub.p)
        state.update(
            radius=update_radius(radius, rho, sub, opts["max_radius"]), rho=rho,
            step=state.get("step", 0) + 1, cg_iterations=int(sub.iterations),
        )
        return f0.detach()
