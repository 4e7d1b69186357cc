"""The critic regression of :func:`trpo.update.fit_critic` without per-minibatch overhead.

TRPO fits the critic with many tiny Adam steps (SB3-contrib's defaults: 10 epochs of
minibatch 128 over 2,048 samples, 160 steps per update). Each step of the generic loop
(``critic(obs[idx])``, ``loss.backward()``, ``optimizer.step()``) spends far more time in
Python, the autograd engine and the optimiser's per-parameter bookkeeping than in its
arithmetic (a 64-64 tanh MLP on 128 states is ~1 MFLOP), and on a GPU every one of its ~60
kernels is a launch. :func:`fit_mlp_critic` runs the same mathematics with the fewest ops:

* all parameters live in **one flat buffer** (views per layer), so the gradient is one
  vector and Adam is one fused kernel over it (``torch._fused_adam_``, what
  ``Adam(fused=True)`` runs; its 7-op formula where that kernel is missing) instead of ~10
  ops per parameter;
* the tanh MLP's **backward is written out** (``dW_l = g_lᵀ h_{l−1}``, ``db_l = Σ g_l``,
  ``g_{l−1} = tanh′ ⊙ (g_l W_l)``), each product written into its slice of the flat
  gradient (``out=``): no graph is recorded, no engine runs;
* each epoch's permutation is applied **once** (one gather), minibatches are contiguous
  views of the shuffled copy.

It is the generic loop's algorithm exactly: the same permutations drawn from the same
generator, the same minibatches, the loss ``mean (V − R)²`` per minibatch, the update of
``torch.optim.Adam`` (bias-corrected, ``eps`` outside the square root) and its state
(``step``, ``exp_avg``, ``exp_avg_sq``) read from and written back to the optimiser, so
checkpoints and later generic steps continue seamlessly. Results agree with the generic
loop up to float rounding (the fused kernel rounds the Adam update in its own order: a few
ulps per step).

It applies only where that equivalence is certain, and returns ``None`` otherwise (the
caller then runs the generic loop): a :class:`trpo.policy.Critic` with its own forward (a
tanh MLP of ``nn.Linear`` layers, checked numerically on the first minibatch), a plain
``torch.optim.Adam`` over exactly its parameters (one group, no weight decay, amsgrad,
maximize, capturable, differentiable or fused), floating dtype, one device.

On CUDA the loop can also be recorded once into a CUDA graph (``cuda_graph=True``) and
replayed for later fits of the same shapes: one launch for all ``epochs × steps`` Adam
steps, so the fit stops being launch-bound (the fused Adam kernel reads its step count from
a device tensor, so nothing changes on the host between the recorded steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trpo.policy import Critic

__all__ = ["FastFitResult", "fit_mlp_critic", "supports_fast_fit"]

_tanh_backward = torch.ops.aten.tanh_backward.default


@dataclass(frozen=True)
class FastFitResult:
    """Mean squared error over the last epoch (a 0-d tensor: no host sync) and Adam steps."""

    value_loss: Tensor
    steps: int


def _linear_layers(critic: nn.Module) -> list[nn.Linear] | None:
    layers = getattr(critic, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    if not all(type(layer) is nn.Linear and layer.bias is not None for layer in layers):
        return None
    return list(layers)


def _adam_options(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> dict | None:
    """lr, betas, eps of a plain Adam over exactly ``params`` (else None)."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(params) or any(
        a is not b for a, b in zip(group["params"], params)
    ):
        return None
    for flag in ("amsgrad", "maximize", "capturable", "differentiable", "fused"):
        if group.get(flag):
            return None
    if group.get("decoupled_weight_decay") or group.get("weight_decay", 0.0) != 0.0:
        return None
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    if not all(isinstance(x, float) and math.isfinite(x) for x in (lr, beta1, beta2, eps)):
        return None
    states = [optimizer.state.get(p, {}) for p in params]
    if any(states) and not all(
        {"step", "exp_avg", "exp_avg_sq"} <= set(s)
        and s["exp_avg"].shape == p.shape
        and s["exp_avg_sq"].shape == p.shape
        for s, p in zip(states, params)
    ):
        return None
    return dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps)


def supports_fast_fit(critic: nn.Module, optimizer: torch.optim.Optimizer, obs: Tensor) -> bool:
    """Whether :func:`fit_mlp_critic` applies (structure checks only, no computation)."""
    if not isinstance(critic, Critic) or type(critic).forward is not Critic.forward:
        return False
    layers = _linear_layers(critic)
    if layers is None:
        return False
    params = list(critic.parameters())
    expected = [t for layer in layers for t in (layer.weight, layer.bias)]
    if len(params) != len(expected) or any(a is not b for a, b in zip(params, expected)):
        return False
    if not obs.dtype.is_floating_point or obs.ndim < 1 or obs.shape[0] == 0:
        return False
    if any(p.dtype != obs.dtype or p.device != obs.device or not p.requires_grad for p in params):
        return False
    if math.prod(obs.shape[1:]) != layers[0].in_features:
        return False
    return _adam_options(optimizer, params) is not None


class _FlatMLP:
    """The critic's parameters, gradient and Adam moments as flat buffers with layer views."""

    def __init__(self, critic: Critic, optimizer: torch.optim.Adam) -> None:
        self.layers = _linear_layers(critic)
        self.params = list(critic.parameters())
        self.optimizer = optimizer
        self.options = _adam_options(optimizer, self.params)
        sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.grad = torch.zeros_like(self.flat)
        self.denom = torch.empty_like(self.flat)
        states = [optimizer.state.get(p, {}) for p in self.params]
        if all(states):
            self.step = int(float(states[0]["step"]))
            self.exp_avg = torch.cat([s["exp_avg"].reshape(-1) for s in states])
            self.exp_avg_sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
        else:
            self.step = 0
            self.exp_avg = torch.zeros_like(self.flat)
            self.exp_avg_sq = torch.zeros_like(self.flat)
        self.fused = fused_adam_available(self.flat.device, self.flat.dtype)
        # The fused kernel's step count: a float32 tensor on the parameters' device.
        self.step_t = torch.full((), float(self.step), dtype=torch.float32, device=self.flat.device)
        shapes = [p.shape for p in self.params]
        split = torch.split
        pv = [v.view(s) for v, s in zip(split(self.flat, sizes), shapes)]
        gv = [v.view(s) for v, s in zip(split(self.grad, sizes), shapes)]
        self.weights, self.biases = pv[0::2], pv[1::2]
        self.weights_t = [w.t() for w in self.weights]
        self.grad_weights, self.grad_biases = gv[0::2], gv[1::2]
        self._sizes, self._shapes = sizes, shapes

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``V(x)`` as ``(k, 1)`` and the layer inputs ``[x, h_1, …]`` the backward needs."""
        inputs = [x]
        last = len(self.weights) - 1
        for i in range(last):
            x = torch.addmm(self.biases[i], x, self.weights_t[i]).tanh_()
            inputs.append(x)
        return torch.addmm(self.biases[last], x, self.weights_t[last]), inputs

    def backward(self, g: Tensor, inputs: list[Tensor]) -> None:
        """Write ``∂loss/∂θ`` into ``self.grad`` given ``g = ∂loss/∂V`` of shape ``(k, 1)``."""
        for i in range(len(self.weights) - 1, -1, -1):
            torch.mm(g.t(), inputs[i], out=self.grad_weights[i])
            torch.sum(g, 0, out=self.grad_biases[i])
            if i > 0:
                g = _tanh_backward(torch.mm(g, self.weights[i]), inputs[i])

    def adam_step(self) -> None:
        """One step of torch.optim.Adam on the flat buffers.

        With the fused kernel (``torch._fused_adam_``, what ``Adam(fused=True)`` runs): one op
        that reads the step count from a device tensor, so it also runs inside a CUDA graph.
        Otherwise the single-tensor formula of ``Adam(foreach=False)``, op for op.
        """
        o = self.options
        self.step += 1
        if self.fused:
            self.step_t += 1
            torch._fused_adam_(
                [self.flat],
                [self.grad],
                [self.exp_avg],
                [self.exp_avg_sq],
                [],
                [self.step_t],
                lr=o["lr"],
                beta1=o["beta1"],
                beta2=o["beta2"],
                weight_decay=0.0,
                eps=o["eps"],
                amsgrad=False,
                maximize=False,
            )
            return
        self.exp_avg.lerp_(self.grad, 1.0 - o["beta1"])
        self.exp_avg_sq.mul_(o["beta2"]).addcmul_(self.grad, self.grad, value=1.0 - o["beta2"])
        bias_correction1 = 1.0 - o["beta1"] ** self.step
        bias_correction2 = 1.0 - o["beta2"] ** self.step
        torch.sqrt(self.exp_avg_sq, out=self.denom)
        self.denom.div_(math.sqrt(bias_correction2)).add_(o["eps"])
        self.flat.addcdiv_(self.exp_avg, self.denom, value=-o["lr"] / bias_correction1)

    def write_back(self) -> None:
        """Copy the flat parameters and moments into the critic and the optimiser state."""
        split = torch.split
        with torch.no_grad():
            for p, v in zip(self.params, split(self.flat, self._sizes)):
                p.copy_(v.view(p.shape))
                p.grad = None
            for p, m, s in zip(
                self.params, split(self.exp_avg, self._sizes), split(self.exp_avg_sq, self._sizes)
            ):
                state = self.optimizer.state[p]
                if "exp_avg" in state:
                    state["exp_avg"].copy_(m.view(p.shape))
                    state["exp_avg_sq"].copy_(s.view(p.shape))
                    state["step"].fill_(float(self.step))
                else:  # as Adam's lazy initialisation creates them
                    state["step"] = torch.tensor(float(self.step), dtype=_scalar_dtype())
                    state["exp_avg"] = m.view(p.shape).clone()
                    state["exp_avg_sq"] = s.view(p.shape).clone()


_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}


def fused_adam_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_adam_`` (a private op of torch.optim) runs here: probed once
    per device type and dtype on a one-element problem, so a torch without it (or with a
    different signature) falls back to the explicit formula."""
    key = (torch.device(device).type, dtype)
    if key not in _FUSED_OK:
        try:
            p, g = (
                torch.zeros(1, dtype=dtype, device=device),
                torch.ones(1, dtype=dtype, device=device),
            )
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            step = torch.ones((), dtype=torch.float32, device=device)
            torch._fused_adam_(
                [p],
                [g],
                [m],
                [v],
                [],
                [step],
                lr=0.5,
                beta1=0.9,
                beta2=0.999,
                weight_decay=0.0,
                eps=1e-8,
                amsgrad=False,
                maximize=False,
            )
            # Adam's first step moves every coordinate by lr·sign(g) (up to eps).
            _FUSED_OK[key] = bool(torch.isclose(p, torch.full_like(p, -0.5)).all())
        except (AttributeError, RuntimeError, TypeError, NotImplementedError):
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _permutations(n: int, epochs: int, generator: torch.Generator | None) -> list[Tensor]:
    # Drawn exactly as the generic loop draws them (CPU, one per epoch, in order).
    return [torch.randperm(n, generator=generator, device="cpu") for _ in range(epochs)]


def fit_mlp_critic(
    critic: Critic,
    optimizer: torch.optim.Optimizer,
    obs: Tensor,
    returns: Tensor,
    *,
    epochs: int,
    minibatch_size: int,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
) -> FastFitResult | None:
    """``epochs`` passes of Adam over shuffled minibatches of ``mean (V(s) − R)²``, fused.

    The algorithm of :func:`trpo.update.fit_critic` (see the module docstring), or ``None``
    when the critic/optimiser are not the plain kinds it reproduces exactly.

    Args:
        critic: A :class:`trpo.policy.Critic`, trained in place.
        optimizer: Its ``torch.optim.Adam`` (state read and written back).
        obs: ``(B, *obs_shape)`` observations.
        returns: ``(B,)`` targets.
        epochs: Passes over the batch.
        minibatch_size: Samples per Adam step (clipped to B).
        generator: RNG of the shuffling (CPU), used as the generic loop uses it.
        cuda_graph: On CUDA, record the whole fit in a CUDA graph (kept on the critic for
            later calls with the same shapes) and replay it.

    Returns:
        A :class:`FastFitResult`, or ``None`` if the fast path does not apply.
    """
    if epochs < 1 or not supports_fast_fit(critic, optimizer, obs):
        return None
    n = obs.shape[0]
    mb = max(1, min(int(minibatch_size), n))
    x_all = obs.reshape(n, -1)
    returns = returns.reshape(n)
    state = _FlatMLP(critic, optimizer)
    with torch.no_grad():
        # Guard: our forward must be the critic's (a changed Critic falls back to generic).
        probe = x_all[:mb]
        ours, _ = state.forward(probe)
        if not torch.allclose(ours.reshape(-1), critic(obs[:mb]), rtol=1e-4, atol=1e-5):
            return None
        # Every epoch's permutation in one host-to-device copy.
        idx_all = torch.stack(_permutations(n, epochs, generator)).to(obs.device)
        total = None
        if cuda_graph:
            from trpo.cuda_graphs import replay_critic_fit

            total = replay_critic_fit(critic, state, x_all, returns, idx_all, mb)
        if total is None:
            total = _minibatch_loop(state, x_all, returns, idx_all, mb)
        state.write_back()
    return FastFitResult(value_loss=total / n, steps=epochs * -(-n // mb))


def _minibatch_loop(
    state: _FlatMLP, x_all: Tensor, returns: Tensor, idx_all: Tensor, mb: int
) -> Tensor:
    """All Adam steps: for each row of ``idx_all`` (an epoch's permutation, on the device),
    the minibatches of ``mb`` consecutive samples of the permuted batch. Returns the last
    epoch's sum of squared errors (a 0-d tensor). No host sync: recordable as a CUDA graph."""
    n = x_all.shape[0]
    epochs = idx_all.shape[0]
    total = torch.zeros((), dtype=x_all.dtype, device=x_all.device)
    for e in range(epochs):
        idx = idx_all[e]
        xs, rs = x_all.index_select(0, idx), returns.index_select(0, idx)
        last_epoch = e == epochs - 1
        for start in range(0, n, mb):
            x, r = xs[start : start + mb], rs[start : start + mb]
            v, inputs = state.forward(x)
            diff = v.view(-1) - r
            # ∂/∂V of mean_k (V − R)² is 2 (V − R) / k.
            state.backward((diff * (2.0 / diff.shape[0])).unsqueeze(1), inputs)
            state.adam_step()
            if last_epoch:
                total = total + torch.dot(diff, diff)
    return total
