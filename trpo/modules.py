"""Your own networks: the protocol a user ``nn.Module`` follows (docs/policies.md has the
table), its one-time checks, and the wrappers that give it the built-in actor's interface.

An actor module maps observations ``(B, *obs_shape)`` to the distribution parameters of the
action family (logits ``(B, K)``; a Gaussian's mean ``(B, d)``, trpo adding ``log_std (d,)``,
or ``(mean, log_std)``; ``(B, ΣK_i)`` or a list of ``(B, K_i)``; Bernoulli logits ``(B, d)``),
a critic module to values ``(B,)`` or ``(B, 1)``. Both are probed once with two zero
observations: a wrong output is a :class:`ModuleProtocolError` naming the fix; train-mode
BatchNorm/Dropout is refused (π_old and π_θ are evaluated many times per update and must be
one function). A factory ``"package.module:fn"`` is called as ``fn(observation_space,
action_space)``. The Fisher of a module is :func:`natgrad.fisher_operator` on ``torch.func``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from natgrad.families import DistParams
from natgrad.guards import broadcasts_to
from trpo.policy import action_family

__all__ = ["ModuleActor", "ModuleCritic", "ModuleProtocolError", "check_user_modules", "load_factory"]


class ModuleProtocolError(ValueError):
    """A user module breaks the protocol of :mod:`trpo.modules` (wrong output, train-mode
    BatchNorm/Dropout); the message names the fix."""


def load_factory(path: str, what: str) -> Callable[..., nn.Module]:
    """The callable named by ``"package.module:factory"`` (importing ``package.module``).

    Raises:
        ValueError: the module cannot be imported or has no such callable (naming ``what``).
    """
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the module's own code may raise anything
        raise ValueError(
            f"{what} {path!r}: importing {module_name!r} failed ({type(e).__name__}: {e}); "
            "check that it is on PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what} {path!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def check_user_modules(saved: Mapping[str, Any], given: Sequence[str]) -> None:
    """Refuse to load a checkpoint whose networks were modules passed to ``train()`` (without a
    factory) unless modules for them are given again (a checkpoint ``validate`` hook).

    Raises:
        ValueError: naming the network and the two ways to rebuild it.
    """
    for name in saved.get("user_modules", ()):
        if name not in given:
            raise ValueError(
                f"this run's {name} was a module passed to train({name}=...) without "
                f"{name}_factory: pass a module of the same architecture again ({name}=... to "
                f"train or load_policy), or name its constructor with {name}_factory="
                "'package.module:factory'"
            )


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a {out.dtype} tensor of shape {tuple(out.shape)}"
    if isinstance(out, (list, tuple)):
        return f"a {type(out).__name__} of {[_describe(o) for o in out]}"
    return f"a {type(out).__name__}"


def _check_modes(module: nn.Module, what: str) -> None:
    for name, sub in module.named_modules():
        stateful = isinstance(sub, _NormBase) and sub.track_running_stats
        random = isinstance(sub, _DropoutNd) and sub.p > 0
        if sub.training and (stateful or random):
            raise ModuleProtocolError(
                f"the {what} module's {name or 'root'} ({type(sub).__name__}) is in train "
                "mode: TRPO evaluates the network many times per update (Fisher, line search) "
                "and each must be the same function, but it would "
                f"{'update its running statistics' if stateful else 'draw new dropout masks'}; "
                "call .eval() on the module before training (its buffers are then constants, "
                "saved in the checkpoint), or remove the layer"
            )


def _probe(module: nn.Module, obs_shape: tuple[int, ...]) -> Any:
    p = next(module.parameters(), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    with torch.no_grad():
        return module(torch.zeros(2, *obs_shape, dtype=dtype, device=getattr(p, "device", None)))


def _is_batch(t: Any, width: int) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and tuple(t.shape) == (2, width)


class ModuleActor(nn.Module):
    """A user actor module behind the built-in actor's interface (module docstring).

    Attributes:
        net: The user's module (trained in place).
        family, action_space, action_dim, nvec: As :class:`trpo.policy.Actor`.
        log_std: ``(d,)`` log σ added when a Box actor module returns only the mean.
    """

    numpy_inference_fn = None  # the rollout uses torch (no numpy twin of a user module)

    def __init__(self, net: nn.Module, observation_space: gym.Space, action_space: gym.Space):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ModuleProtocolError(f"actor must be a torch.nn.Module, got {_describe(net)}")
        _check_modes(net, "actor")
        self.family, self.action_dim, self.nvec = action_family(action_space)
        self.action_space, self.net = action_space, net
        out = _probe(net, tuple(observation_space.shape))
        if self.family == "diag_gaussian" and isinstance(out, Tensor):
            self.log_std = nn.Parameter(torch.zeros(self.action_dim, dtype=out.dtype))
        self._check(out)

    def _check(self, out: Any) -> None:
        d, fam = self.action_dim, self.family
        if fam == "diag_gaussian":
            ok = _is_batch(out, d) or (
                isinstance(out, (tuple, list)) and len(out) == 2 and _is_batch(out[0], d)
                and isinstance(out[1], Tensor)
                and broadcasts_to(out[1].shape, (2, d))
            )
            want = f"the mean (B, {d}), or (mean (B, {d}), log_std (d,) or (B, {d}))"
        elif fam == "multi_categorical":
            ok = _is_batch(out, d) or (
                isinstance(out, (tuple, list)) and len(out) == len(self.nvec)
                and all(_is_batch(o, k) for o, k in zip(out, self.nvec))
            )
            want = f"logits (B, {d}) or a list of logits (B, K_i) for K = {list(self.nvec)}"
        else:
            ok = _is_batch(out, d)
            want = f"logits (B, {d})"
        if not ok:
            raise ModuleProtocolError(
                f"the actor module returned {_describe(out)} for a batch of B = 2 observations; "
                f"for the action space {self.action_space} ({fam}) it must return {want}: fix "
                "its output layer (docs/policies.md, the protocol)"
            )

    def forward(self, obs: Tensor) -> DistParams:
        """Distribution parameters, structured as :meth:`trpo.policy.Actor.forward`'s."""
        return self.structure(self.net(obs))

    def structure(self, out: Any) -> DistParams:
        """The module's output as :meth:`trpo.policy.Actor.forward` returns it."""
        if self.family == "diag_gaussian":
            return (out, self.log_std) if isinstance(out, Tensor) else tuple(out)
        if self.family == "multi_categorical":
            return list(torch.split(out, self.nvec, -1)) if isinstance(out, Tensor) else list(out)
        return out

    def inference_fn(self) -> Callable[[Tensor], DistParams]:
        """``obs -> dist params`` for the rollout: :meth:`forward`."""
        return self.forward

    def functional_dist_params(self, params: Mapping[str, Tensor], obs: Tensor) -> DistParams:
        """``forward`` with the parameters taken from ``params`` (``functional_call``)."""
        return functional_call(self, params, (obs,))

    def written_out_dist_fn(self, params: Mapping[str, Tensor], obs: Tensor) -> None:
        """None: a user module's Fisher runs on ``torch.func`` (no written-out products)."""
        return None


class ModuleCritic(nn.Module):
    """A user critic module ``(B, *obs_shape) -> (B,)`` or ``(B, 1)``, returning ``(B,)``."""

    def __init__(self, net: nn.Module, observation_space: gym.Space):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ModuleProtocolError(f"critic must be a torch.nn.Module, got {_describe(net)}")
        _check_modes(net, "critic")
        self.net, self.obs_ndim = net, len(observation_space.shape)
        out = _probe(net, tuple(observation_space.shape))
        if not (isinstance(out, Tensor) and tuple(out.shape) in ((2,), (2, 1))):
            raise ModuleProtocolError(
                f"the critic module returned {_describe(out)} for a batch of B = 2 "
                "observations; it must return values of shape (B,) or (B, 1): fix its output "
                "layer (docs/policies.md, the protocol)"
            )

    def forward(self, obs: Tensor) -> Tensor:
        """State values ``V(s)`` of shape ``(B,)``."""
        v = self.net(obs)
        return v.squeeze(-1) if v.ndim == obs.ndim - self.obs_ndim + 1 else v
