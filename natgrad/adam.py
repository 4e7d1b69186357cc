"""Adam with ``torch.optim.Adam``'s arithmetic and state format, without ``torch.optim``.

Constructing any ``torch.optim.Optimizer`` imports ``torch._dynamo`` (its methods are wrapped
in ``torch._disable_dynamo``, which imports it on the first call): 1.1-1.8 s on this 2-core
machine, a tenth of a 100k-step CartPole run. :class:`Adam` is the plain algorithm
(Kingma & Ba 2015, as ``torch.optim.Adam(foreach=False)`` computes it, one parameter group,
no weight decay, amsgrad or maximize)::

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
    θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

with the same duck-typed surface (``param_groups``, ``state``, ``zero_grad``, ``step``,
``state_dict``, ``load_state_dict``) and the same ``state_dict`` layout, so a state saved by
either class loads into the other. :func:`adam_update_` is that formula, the one copy shared
with :class:`natgrad.mlp.FlatMLP`'s fallback when the fused kernel is missing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Adam", "adam_update_", "step_dtype", "unsupported_options"]

# The flags of torch.optim.Adam's param group that this class cannot honour when set.
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


def unsupported_options(group: dict[str, Any]) -> list[str]:
    """The options set in a ``torch.optim.Adam`` param group that plain Adam (this class,
    :class:`natgrad.mlp.FlatMLP`) does not compute: flags and weight decay."""
    bad = [k for k in _UNSUPPORTED if group.get(k)]
    if group.get("weight_decay", 0.0) or group.get("decoupled_weight_decay"):
        bad.append("weight_decay")
    return bad


def step_dtype() -> torch.dtype:
    """The dtype ``torch.optim.Adam`` gives its lazily created ``"step"`` tensor."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def adam_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One Adam update of ``param`` in place (``step`` ≥ 1 counts this update), op for op as
    ``torch.optim.Adam(foreach=False)`` without weight decay: same results bit for bit."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class Adam:
    """``torch.optim.Adam(params, lr, betas, eps)`` without the ``torch._dynamo`` import.

    Args:
        params: The tensors to optimise (one group).
        lr: Learning rate > 0.
        betas: ``(β₁, β₂)``, each in [0, 1).
        eps: ε ≥ 0 added to the denominator.

    Raises:
        ValueError: empty or repeated ``params``, or a hyperparameter out of range.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        params = list(params)
        if not params or any(not isinstance(p, Tensor) for p in params):
            raise ValueError("Adam needs a non-empty sequence of tensors")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("Adam got a parameter more than once")
        _check_hyperparameters(lr, betas, eps)
        self.param_groups: list[dict[str, Any]] = [
            dict(params=params, lr=float(lr), betas=tuple(map(float, betas)), eps=float(eps),
                 weight_decay=0.0, amsgrad=False, maximize=False, foreach=None,
                 capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False)
        ]  # fmt: skip
        # A defaultdict as in torch.optim, whose users (FlatMLP.write_back) fill it in.
        self.state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (``None``, or zeros with ``set_to_none=False``)."""
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; returns ``closure()`` if given
        (evaluated with gradients enabled, before the update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(
                    step=torch.tensor(0.0, dtype=step_dtype()),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )
            state["step"] += 1
            adam_update_(
                p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            )  # fmt: skip
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Adam``'s layout: ``{"state": {index: {...}}, "param_groups": [...]}``,
        parameters named by their index; the state tensors are references, not copies."""
        params = self.param_groups[0]["params"]
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(params)))
        state = {i: dict(self.state[p]) for i, p in enumerate(params) if self.state.get(p)}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class or by a plain ``torch.optim.Adam`` over the same
        parameters (tensors copied to each parameter's device; ``step`` kept on the CPU).

        Raises:
            ValueError: not one group of as many parameters, mismatched shapes, missing
                state entries, or a flag this class cannot honour (amsgrad, weight decay, …).
        """
        groups = state_dict.get("param_groups", [])
        params = self.param_groups[0]["params"]
        if len(groups) != 1 or len(groups[0].get("params", ())) != len(params):
            raise ValueError(
                f"optimizer state has {len(groups)} group(s) of "
                f"{[len(g.get('params', ())) for g in groups]} parameters; expected one "
                f"group of {len(params)}"
            )
        saved = groups[0]
        bad = unsupported_options(saved)
        if bad:
            raise ValueError(f"optimizer state uses {bad}, which natgrad.adam.Adam does not do")
        _check_hyperparameters(saved["lr"], saved["betas"], saved["eps"])
        states: dict[Tensor, dict[str, Tensor]] = {}
        for index, p in zip(saved["params"], params):
            entry = state_dict["state"].get(index)
            if entry is None:
                continue
            if not {"step", "exp_avg", "exp_avg_sq"} <= set(entry) or any(
                entry[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq")
            ):
                raise ValueError(f"optimizer state of parameter {index} does not fit its shape")
            states[p] = dict(
                step=torch.as_tensor(entry["step"], dtype=step_dtype()).detach().cpu().clone(),
                exp_avg=entry["exp_avg"].detach().to(p.device, p.dtype, copy=True),
                exp_avg_sq=entry["exp_avg_sq"].detach().to(p.device, p.dtype, copy=True),
            )
        self.state = defaultdict(dict, states)
        for key in ("lr", "eps"):
            self.param_groups[0][key] = float(saved[key])
        self.param_groups[0]["betas"] = tuple(map(float, saved["betas"]))

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return f"natgrad.adam.Adam(lr={g['lr']}, betas={g['betas']}, eps={g['eps']})"


def _check_hyperparameters(lr: Any, betas: Any, eps: Any) -> None:
    beta_pair = tuple(betas) if isinstance(betas, (tuple, list)) else ()
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if len(beta_pair) != 2 or not all(
        isinstance(b, (int, float)) and 0 <= b < 1 for b in beta_pair
    ):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
