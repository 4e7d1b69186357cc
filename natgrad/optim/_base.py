"""What the natgrad optimizers share: a functional view of the model and the closure.

The closure contract (one for every optimizer in :mod:`natgrad.optim`):

* ``closure()`` takes no argument, evaluates the training loss on the current minibatch
  **by calling the model given to the optimizer** and returns it as a scalar tensor (for
  ``NaturalGradient(..., family="empirical")``: the per-sample losses ``(B,)``, whose mean
  is minimised);
* it does **not** call ``backward()`` or ``zero_grad()``: the optimizer differentiates it.

The optimizer calls the closure inside :func:`torch.func.functional_call` on a wrapper
module that holds the model, so the model sees candidate parameters without any write
into ``param.data``; this makes ``θ -> loss(θ)`` a pure function of a parameter dict, the
form every natgrad operator takes. Trial points (reduction ratios, line searches) are
evaluated under :func:`torch.no_grad`. The curvature (GGN / Fisher) needs the model's
outputs on a curvature batch: ``step(closure, inputs)`` passes the model inputs of that
batch (e.g. a subsample of the minibatch, as Martens 2010 uses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from natgrad.curvature import FAMILIES, fisher_operator, ggn_operator, kl_hessian_operator
from natgrad.linop import LinearOperator
from natgrad.params import ParamSpace, flat_grad

Closure = Callable[[], Tensor]


class _ClosureModule(nn.Module):
    """``forward()`` runs the closure; functional_call swaps ``self.model``'s parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.closure: Closure | None = None

    def forward(self) -> Tensor:
        return self.closure()


class ModelView:
    """The optimized parameters of ``model`` as one flat vector, and pure functions of it.

    Args:
        model: The module whose parameters are optimised (all or a subset).
        params: The optimizer's parameters (in param-group order); each must be a
            parameter of ``model``.
    """

    def __init__(self, model: nn.Module, params: list[Tensor]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        by_id = {id(p): name for name, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"parameters {missing} of the optimizer are not parameters of model; pass "
                "model.parameters() (or a subset) and the same model"
            )
        self.model = model
        self.params = params
        self.names = [by_id[id(p)] for p in params]
        self.space = ParamSpace(dict(zip(self.names, (p.detach() for p in params))))
        self._wrapper = _ClosureModule(model)

    # ------------------------------------------------------------ flat vectors
    def flat(self) -> Tensor:
        """The current parameters as a flat ``(n,)`` vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        return self.space.unravel(flat)

    @torch.no_grad()
    def write(self, flat: Tensor) -> None:
        """Set the parameters (in place, as every torch optimizer does) from ``flat``."""
        for p, new in zip(self.params, self.space.unravel(flat).values()):
            p.copy_(new)

    # ------------------------------------------------------- pure functions
    def loss_fn(self, closure: Closure, reduce: str = "scalar") -> Callable[..., Tensor]:
        """``θ_dict -> closure()`` evaluated with the model's parameters replaced by ``θ``.

        ``reduce``: ``"scalar"`` (the closure must return a scalar), ``"mean"`` (the mean of
        per-sample losses, or the scalar) or ``"none"`` (the per-sample losses, flat).
        """
        wrapper = self._wrapper
        names = self.names

        def fn(p: Mapping[str, Tensor]) -> Tensor:
            wrapper.closure = closure
            try:
                out = functional_call(wrapper, {"model." + k: p[k] for k in names}, ())
            finally:
                wrapper.closure = None
            return _check_loss(out, reduce)

        return fn

    def outputs_fn(self) -> Callable[..., Any]:
        """``(θ_dict, *inputs) -> model(*inputs)`` with the parameters replaced by ``θ``."""
        model = self.model

        def fn(p: Mapping[str, Tensor], *inputs: Any) -> Any:
            return functional_call(model, dict(p), inputs)

        return fn

    def value_grad(
        self, closure: Closure, flat: Tensor, reduce: str = "scalar"
    ) -> tuple[Tensor, Tensor]:
        """Loss and flat gradient at ``flat``: one forward and one backward."""
        return flat_grad(self.loss_fn(closure, reduce), self.as_dict(flat))

    @torch.no_grad()
    def value(self, closure: Closure, flat: Tensor, reduce: str = "mean") -> Tensor:
        """The loss at ``flat`` (no graph)."""
        return self.loss_fn(closure, reduce)(self.as_dict(flat))

    # -------------------------------------------------------------- curvature
    def curvature(
        self,
        kind: str,
        flat: Tensor,
        *,
        closure: Closure | None = None,
        inputs: Any = None,
        loss: str | Callable[[Any, Any], Any] = "cross_entropy",
        family: str | None = None,
    ) -> LinearOperator:
        """The curvature operator at ``flat`` (natgrad's operators, nothing re-implemented).

        ``kind``: ``"ggn"`` (``ggn_operator`` of the model outputs on ``inputs`` with
        ``output_hessian=loss``), ``"fisher"`` (``fisher_operator`` with ``family``),
        ``"empirical"`` (``(1/B) Σ ∇ℓ_i ∇ℓ_iᵀ = J_ℓᵀJ_ℓ / B`` as the GGN of the per-sample
        losses ``ℓ`` returned by the closure with ``H_out = I/B``), ``"hessian"`` (the
        Hessian of the closure's loss by double backprop).
        """
        at = self.as_dict(flat)
        if kind == "hessian":
            return kl_hessian_operator(self.loss_fn(closure), at)
        if kind == "empirical":
            per_sample = self.loss_fn(closure, "none")
            with torch.no_grad():
                B = per_sample(at).numel()
            return ggn_operator(per_sample, at, output_hessian=lambda z, t: t / B)
        inputs = _as_tuple(inputs)
        if not inputs:
            raise ValueError(
                f"curvature {kind!r} needs the model inputs of the curvature batch: "
                "step(closure, inputs)"
            )
        try:
            if kind == "ggn":
                return ggn_operator(self.outputs_fn(), at, *inputs, output_hessian=loss)
            return fisher_operator(self.outputs_fn(), at, *inputs, family=family)
        except ValueError as e:
            what = f"family={family!r}" if kind == "fisher" else f"loss={loss!r}"
            raise ValueError(f"the model's outputs do not fit {what}: {e}") from e


def _as_tuple(inputs: Any) -> tuple:
    if inputs is None:
        return ()
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def _check_loss(out: Any, reduce: str) -> Tensor:
    if not isinstance(out, Tensor) or not out.dtype.is_floating_point:
        raise TypeError(
            "closure must return the loss as a floating tensor (and must not call backward), "
            f"got {type(out).__name__}"
        )
    if reduce == "scalar":
        if out.numel() != 1:
            raise ValueError(
                f"closure must return a scalar loss, got shape {tuple(out.shape)} (per-sample "
                "losses are for NaturalGradient(family='empirical'))"
            )
        return out.reshape(())
    return out.mean() if reduce == "mean" else out.reshape(-1)


def check_closure(closure: Any) -> Closure:
    if not callable(closure):
        raise TypeError(
            "step needs a closure: a callable () -> loss that evaluates the model given to "
            "the optimizer (see natgrad.optim's closure contract)"
        )
    return closure


def check_nonneg(name: str, value: float, *, positive: bool = False) -> float:
    """``value`` as a float; ValueError naming ``name`` unless finite and ≥ 0 (> 0)."""
    value = float(value)
    ok = value > 0 if positive else value >= 0
    if not (ok and value < float("inf")):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def group_scale(groups: Iterable[dict], view: ModelView, key: str = "lr") -> Tensor:
    """A flat vector holding each parameter's group value of ``key`` (per-group ``lr``)."""
    scale = {id(p): float(g[key]) for g in groups for p in g["params"]}
    return torch.cat(
        [torch.full((p.numel(),), scale[id(p)], dtype=p.dtype, device=p.device)
         for p in view.params]
    )


def check_family(family: str | None) -> None:
    if family is not None and family not in FAMILIES + ("empirical",):
        raise ValueError(f"family must be one of {FAMILIES + ('empirical',)}, got {family!r}")
