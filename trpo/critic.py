"""The critic V_φ: regression on the GAE returns, and how well it explains them.

:func:`fit_critic` runs ``epochs`` passes of Adam over shuffled minibatches of the loss
``mean_t (V_φ(s_t) − R_t)²``. Each epoch draws one permutation of the batch and cuts it
into ``K = ⌈N / minibatch_size⌉`` near-equal contiguous pieces (``torch.tensor_split``;
exactly pieces of ``minibatch_size`` when it divides ``N``), one Adam step each.

One loop serves every case, through two injected pieces:

* the **trainer** of one minibatch step: the readable autograd step (``loss.backward()``,
  ``optimizer.step()``) or, for the plain tanh-MLP :class:`~trpo.policy.Critic` with a plain
  ``torch.optim.Adam``, the same step on :class:`natgrad.mlp.FlatMLP` (one flat buffer,
  written-out backward, fused Adam: no autograd or optimiser overhead per step, and no host
  sync, so on CUDA all the steps of a fit can be one recorded CUDA graph);
* the **reducer** (:class:`natgrad.distributed.Reducer`): in data-parallel runs ``obs`` is
  this process's shard, ``N`` the global batch, and minibatch ``k`` is the union of every
  process's ``k``-th piece; its gradient, of ``Σ (V − R)² / N_k`` with ``N_k`` the global
  piece size, is summed over processes before each Adam step, so every process takes the
  same steps. :data:`~natgrad.distributed.LOCAL` (one process) is the identity.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from natgrad import cuda_graph
from natgrad.adam import Adam
from natgrad.distributed import LOCAL, Reducer
from natgrad.mlp import FlatMLP, adam_options
from trpo.policy import Critic

__all__ = [
    "CriticFitResult",
    "CriticOptimizer",
    "CriticSettings",
    "explained_variance",
    "fit_critic",
    "supports_fast_fit",
]


@dataclass(frozen=True)
class CriticSettings:
    """How :func:`fit_critic` fits.

    Attributes:
        epochs: Passes over the batch (≥ 1).
        minibatch_size: Samples per Adam step (≥ 1; clipped to the batch).
        cuda_graph: On CUDA, with the fused trainer and one process, record all the Adam
            steps of a fit as one CUDA graph and replay it for later fits of the same shapes.
    """

    epochs: int = 10
    minibatch_size: int = 128
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "minibatch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_config(cls, config: Any) -> CriticSettings:
        """From a :class:`~trpo.config.TRPOConfig` (``critic_epochs``,
        ``critic_minibatch_size``, ``cuda_graph``) or any object with those attributes."""
        return cls(
            epochs=config.critic_epochs,
            minibatch_size=config.critic_minibatch_size,
            cuda_graph=config.cuda_graph,
        )


@dataclass(frozen=True)
class CriticFitResult:
    """Mean squared error of the critic over its last epoch (global batch), and Adam steps."""

    value_loss: float
    steps: int


def settings_from_keywords(
    settings_type: type, legacy: dict[str, Any], reducer: Reducer
) -> tuple[Any, Reducer]:
    """The deprecated keyword form of ``fit_critic`` / ``policy_step`` (``epochs=...``,
    ``distributed=True``): the settings object and the reducer it meant."""
    warnings.warn(
        f"passing {sorted(legacy)} as keywords is deprecated: pass a {settings_type.__name__} "
        "(and reducer=natgrad.distributed.Reducer() for distributed=True)",
        DeprecationWarning,
        stacklevel=3,
    )
    distributed = legacy.pop("distributed", False)
    known = {f.name for f in fields(settings_type)}
    if set(legacy) - known:
        raise TypeError(f"unexpected keyword arguments {sorted(set(legacy) - known)}")
    return settings_type(**legacy), (Reducer() if distributed else reducer)


#: The critic's optimiser: a ``torch.optim`` one, or :class:`natgrad.adam.Adam` (what
#: :func:`trpo.train` builds: the same arithmetic without the ``torch._dynamo`` import).
CriticOptimizer = torch.optim.Optimizer | Adam


# --------------------------------------------------------------------------- trainers
class _AutogradTrainer:
    """One minibatch step by autograd and the critic's own optimiser (any critic/optimiser)."""

    def __init__(self, critic: nn.Module, optimizer: CriticOptimizer, reducer: Reducer):
        self.critic, self.optimizer, self.reducer = critic, optimizer, reducer

    def step(self, obs: Tensor, returns: Tensor, n_k: float) -> Tensor:
        """Adam on ``Σ (V − R)² / n_k`` (gradients summed over processes); returns ``V − R``."""
        diff = self.critic(obs) - returns
        sq_sum = diff.pow(2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        (sq_sum / n_k).backward()
        self.reducer.sum_gradients(self.critic.parameters())
        self.optimizer.step()
        return diff.detach()

    def finish(self) -> None:
        pass


class _FusedTrainer:
    """The same step on :class:`natgrad.mlp.FlatMLP` (written-out backward, fused Adam)."""

    def __init__(self, flat: FlatMLP, reducer: Reducer):
        self.flat, self.reducer = flat, reducer

    def step(self, obs: Tensor, returns: Tensor, n_k: float) -> Tensor:
        v, inputs = self.flat.forward(obs.reshape(obs.shape[0], -1))
        diff = v.view(-1) - returns
        # ∂/∂V of Σ (V − R)² / n_k is 2 (V − R) / n_k.
        self.flat.backward((diff * (2.0 / n_k)).unsqueeze(1), inputs)
        self.reducer.sum_(self.flat.grad)
        self.flat.adam_step()
        return diff

    def finish(self) -> None:
        self.flat.write_back()


def supports_fast_fit(critic: nn.Module, optimizer: CriticOptimizer, obs: Tensor) -> bool:
    """Whether the fused trainer applies: the plain :class:`Critic` (its own forward, a tanh
    MLP of ``nn.Linear`` layers), a plain Adam (``torch.optim`` or :mod:`natgrad.adam`) over
    exactly its parameters (:func:`natgrad.mlp.adam_options`), floating ``obs`` of its dtype
    and device. Structure checks only; :func:`fit_critic` also compares the forwards
    numerically once per fit."""
    if not isinstance(critic, Critic) or type(critic).forward is not Critic.forward:
        return False
    layers = list(critic.layers)
    if not layers or not all(type(m) is nn.Linear and m.bias is not None for m in layers):
        return False
    params = list(critic.parameters())
    if len(params) != 2 * len(layers) or any(
        p is not q for p, q in zip(params, (t for m in layers for t in (m.weight, m.bias)))
    ):
        return False
    if not obs.dtype.is_floating_point or obs.ndim < 1 or obs.shape[0] == 0:
        return False
    if any(p.dtype != obs.dtype or p.device != obs.device or not p.requires_grad for p in params):
        return False
    if math.prod(obs.shape[1:]) != layers[0].in_features:
        return False
    return adam_options(optimizer, params) is not None


def _trainer(
    critic: nn.Module, optimizer: CriticOptimizer, obs: Tensor, reducer: Reducer
) -> _AutogradTrainer | _FusedTrainer:
    """The fused trainer where it reproduces the autograd step exactly (on every process:
    the verdict is reduced), else the autograd trainer."""
    flat = None
    if supports_fast_fit(critic, optimizer, obs):
        flat = FlatMLP(list(critic.parameters()), optimizer, critic.activation)
        with torch.no_grad():  # guard: our forward must be the critic's
            probe = obs[:64]
            ours = flat.forward(probe.reshape(probe.shape[0], -1))[0].reshape(-1)
            if not torch.allclose(ours, critic(probe), rtol=1e-4, atol=1e-5):
                flat = None
    if reducer.all(flat is not None):
        return _FusedTrainer(flat, reducer)
    return _AutogradTrainer(critic, optimizer, reducer)


# ------------------------------------------------------------------------------ fit
def _epochs(
    trainer: _AutogradTrainer | _FusedTrainer,
    obs: Tensor,
    returns: Tensor,
    perms: Tensor,
    sizes: list[int],
    global_sizes: list[float],
) -> Tensor:
    """All Adam steps: for each row of ``perms`` (an epoch's permutation, on the device) the
    pieces of ``sizes`` of the permuted batch, piece ``k`` scaled by its global size. Returns
    the last epoch's sum of squared errors (0-d). No host sync with the fused trainer."""
    total = torch.zeros((), dtype=obs.dtype, device=obs.device)
    for epoch, perm in enumerate(perms):
        xs, rs = obs.index_select(0, perm), returns.index_select(0, perm)
        last = epoch == len(perms) - 1  # the loss is reported for the last epoch only
        start = 0
        for size, n_k in zip(sizes, global_sizes):
            if n_k > 0:  # empty everywhere only if minibatch_size < the number of processes
                diff = trainer.step(xs[start : start + size], rs[start : start + size], n_k)
                if last:
                    total = total + torch.dot(diff, diff)
            start += size
    return total


def fit_critic(
    critic: nn.Module,
    optimizer: CriticOptimizer,
    obs: Tensor,
    returns: Tensor,
    settings: CriticSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    reducer: Reducer = LOCAL,
    **legacy: Any,
) -> CriticFitResult:
    """Regress V_φ(s) on the returns R: ``epochs`` passes of Adam over shuffled minibatches.

    Loss of minibatch ``k``: ``Σ_{t∈k} (V_φ(s_t) − R_t)² / N_k`` (its mean over the global
    minibatch); the pieces are described in the module docstring.

    Args:
        critic: The value network ``(B, *obs_shape) -> (B,)``, trained in place.
        optimizer: Its optimiser (state kept across fits).
        obs: ``(B, *obs_shape)`` observations (this process's shard).
        returns: ``(B,)`` targets.
        settings: A :class:`CriticSettings`. (The keywords ``epochs``, ``minibatch_size``,
            ``cuda_graph`` and ``distributed`` still work and warn: deprecated.)
        generator: RNG of the shuffling (one CPU permutation per epoch).
        reducer: The cross-process reduction (:data:`~natgrad.distributed.LOCAL`: none).

    Returns:
        A :class:`CriticFitResult`.
    """
    if legacy:
        settings, reducer = settings_from_keywords(CriticSettings, legacy, reducer)
    if settings is None:
        raise TypeError("fit_critic needs settings (a CriticSettings)")
    n = obs.shape[0]
    n_global = int(reducer.sum(torch.tensor([float(n)], dtype=torch.float64))[0])
    k = -(-n_global // max(1, min(settings.minibatch_size, n_global)))
    sizes = [len(piece) for piece in torch.tensor_split(torch.arange(n), k)]
    global_sizes = reducer.sum(torch.tensor(sizes, dtype=torch.float64)).tolist()
    # Every epoch's permutation, drawn on the CPU in order, in one host-to-device copy.
    perms = torch.stack(
        [torch.randperm(n, generator=generator, device="cpu") for _ in range(settings.epochs)]
    ).to(obs.device)
    returns = returns.reshape(n)
    trainer = _trainer(critic, optimizer, obs, reducer)
    with torch.set_grad_enabled(isinstance(trainer, _AutogradTrainer)):
        total = None
        if settings.cuda_graph and isinstance(trainer, _FusedTrainer) and not reducer.active:
            total = _replay_fit(critic, trainer.flat, obs, returns, perms, sizes)
        if total is None:
            total = _epochs(trainer, obs, returns, perms, sizes, global_sizes)
        trainer.finish()
    value_loss = float(reducer.sum(total.reshape(1))[0]) / n_global
    return CriticFitResult(
        value_loss=value_loss, steps=settings.epochs * sum(s > 0 for s in global_sizes)
    )


def _replay_fit(
    critic: nn.Module, flat: FlatMLP, obs: Tensor, returns: Tensor, perms: Tensor, sizes: list[int]
) -> Tensor | None:
    """:func:`_epochs` of the fused trainer by replaying a recorded CUDA graph
    (:mod:`natgrad.cuda_graph`): ``flat`` ends as the eager loop would leave it. ``None``
    (the caller runs eagerly) where recording is impossible or failed."""
    if not cuda_graph.recordable(obs.device) or not flat.fused:
        return None
    key = (
        "critic",
        tuple(obs.shape),
        tuple(perms.shape),
        tuple(sizes),
        obs.dtype,
        str(obs.device),
        tuple(sorted(flat.options.items())),
        cuda_graph.parameter_signature(critic),
    )

    def make() -> tuple[FlatMLP, Tensor, Tensor, Tensor, cuda_graph.Recording]:
        static = FlatMLP(flat.params, flat.optimizer)  # its own flat buffers: the static ones
        x, r, p = obs.clone(), returns.clone(), perms.clone()
        trainer = _FusedTrainer(static, LOCAL)
        sizes_f = [float(s) for s in sizes]
        rec = cuda_graph.record(lambda: _epochs(trainer, x, r, p, sizes, sizes_f), obs.device)
        return static, x, r, p, rec

    entry = cuda_graph.CACHE.get(critic, key, make)
    if entry is None:
        return None
    static, x, r, p, rec = entry
    for dst, src in (
        (static.flat, flat.flat),
        (static.exp_avg, flat.exp_avg),
        (static.exp_avg_sq, flat.exp_avg_sq),
        (x, obs),
        (r, returns),
        (p, perms),
    ):
        dst.copy_(src)
    static.set_step(flat.step)
    rec.replay()
    for dst, src in (
        (flat.flat, static.flat),
        (flat.exp_avg, static.exp_avg),
        (flat.exp_avg_sq, static.exp_avg_sq),
    ):
        dst.copy_(src)
    flat.set_step(flat.step + len(perms) * sum(s > 0 for s in sizes))
    return rec.outputs.clone()


def explained_variance(values: Tensor, returns: Tensor, reducer: Reducer = LOCAL) -> float:
    """``1 − Var(R − V) / Var(R)`` over the (global) batch: 1 = perfect critic, 0 = no better
    than a constant, NaN if ``Var(R) = 0``. Computed in float64 as two global means
    (the mean, then the centred second moment), so shards of any sizes give the one-process
    value."""
    x = torch.stack([returns, returns - values], dim=1).detach().to(torch.float64)
    weight = reducer.weight(x.shape[0])
    mean = reducer.mean(x.mean(0), weight)
    var = reducer.mean((x - mean).pow(2).mean(0), weight)
    if float(var[0]) == 0.0:
        return math.nan
    return float(1.0 - var[1] / var[0])
