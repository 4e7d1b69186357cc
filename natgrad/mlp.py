"""A plain MLP written out once: forward (torch and numpy), ``J v``, ``Jᵀ u``, flat-buffer Adam.

The network is ``z = W_L σ(… σ(W_1 x + b_1) …) + b_L`` with ``σ = tanh`` (or ``relu``) on
the hidden layers, given as a sequence of layers ``((W_1, b_1), …, (W_L, b_L))`` with
``W_l`` of shape ``(out_l, in_l)`` as in :class:`torch.nn.Linear`. Everything here is that
formula and its derivatives, each written once:

* :func:`forward`: the torch forward (differentiable by autograd and ``torch.func``), which
  can keep the layer inputs ``h_0 = x, h_1, …, h_{L−1}`` the products below need;
  :func:`numpy_forward`: the same in numpy (a numpy op on a tiny array costs about a third
  of a torch op, which is most of a small network's per-step cost during a rollout);
* :func:`jvp` (``J v``, forward tangent, layer by layer)::

      t_1 = V_1 x + c_1,   t_l = W_l (d_{l−1} ⊙ t_{l−1}) + V_l h_{l−1} + c_l

  with ``v = ((V_l, c_l))`` a direction in parameter space and ``d_l = σ′`` at layer ``l``
  (``1 − h_l²`` for tanh, ``1[h_l > 0]`` for relu);
* :func:`vjp` (``Jᵀ u``, backward): ``dW_l = g_lᵀ h_{l−1}``, ``db_l = Σ_s g_l``,
  ``g_{l−1} = d_{l−1} ⊙ (g_l W_l)``, ``g_L = u``.

These are the products ``torch.func`` computes (10 ``mm`` for two hidden layers) without the
autograd engine, the double-backward graph and the pytree bookkeeping: ~1.5× faster per
Fisher-vector product on CPU (``bench/fvp_timing.py``, row ``fisher_operator[custom]``).

Two users on top:

* :class:`MLPDistFn`: a ``dist_fn(params, x)`` for
  :func:`natgrad.curvature.fisher_operator` with the method ``linearize`` of its
  ``linearization="custom"`` protocol, so the Fisher of an MLP policy runs on the written-out
  products. :func:`mlp_dist_fn` builds it for an ``nn.Sequential`` of ``Linear`` and
  ``Tanh``/``ReLU`` modules: any natgrad user with such a network gets the fast Fisher::

      dist = mlp_dist_fn(net, family="categorical")
      F = fisher_operator(dist, dict(net.named_parameters()), x, family="categorical",
                          linearization="custom")

* :class:`FlatMLP`: the parameters, gradient and Adam moments of an MLP in one flat buffer
  each, with :func:`vjp` writing the gradient into its slices and ``torch.optim.Adam``'s
  update as one fused kernel: a minibatch Adam step without autograd or per-parameter
  optimiser overhead (and without host syncs, so a loop of them can be a CUDA graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.adam import Adam, adam_update_, step_dtype, unsupported_options
from natgrad.curvature import FAMILIES

__all__ = [
    "ACTIVATIONS",
    "AdamOptions",
    "FlatMLP",
    "Layers",
    "MLPDistFn",
    "adam_options",
    "forward",
    "fused_adam_available",
    "jvp",
    "mlp_dist_fn",
    "numpy_forward",
    "vjp",
]

ACTIVATIONS = ("tanh", "relu")

#: ``((W_1, b_1), …, (W_L, b_L))``, ``W_l`` of shape ``(out_l, in_l)``, ``b_l`` of ``(out_l,)``.
Layers = Sequence[tuple[Tensor, Tensor]]

_IN_PLACE = {"tanh": torch.tanh_, "relu": torch.relu_}
_NUMPY_DTYPES = (torch.float32, torch.float64)
_is_wrapped: Callable[[Tensor], bool] = getattr(
    torch._C._functorch, "is_functorch_wrapped_tensor", lambda x: False
)
_NUMPY = {"tanh": np.tanh, "relu": lambda a: np.maximum(a, 0.0)}
# σ′ applied to a gradient, from σ's *output* h (both activations allow that).
_BACKWARD = {
    "tanh": torch.ops.aten.tanh_backward.default,
    "relu": lambda g, h: torch.ops.aten.threshold_backward.default(g, h, 0.0),
}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- forward
def _numpy_tanh_(x: Tensor) -> Tensor:
    # numpy's float tanh is 7x faster than torch.tanh on this CPU (8.6 vs 61 µs on 256 x 64
    # float32, one thread, AVX-512) and as accurate (≤ 1 ulp apart): the critic's minibatch
    # step spent a third of its time in torch.tanh. torch.func's wrapped tensors have no
    # numpy view, hence the check.
    if (
        x.device.type != "cpu"
        or x.dtype not in _NUMPY_DTYPES
        or not x.is_contiguous()
        or _is_wrapped(x)
    ):
        return x.tanh_()
    a = x.numpy()
    np.tanh(a, out=a)
    return x


_FAST_IN_PLACE = {"tanh": _numpy_tanh_, "relu": torch.relu_}


def forward(
    x: Tensor,
    layers: Layers,
    activation: str = "tanh",
    *,
    inputs: list[Tensor] | None = None,
    differentiable: bool = True,
) -> Tensor:
    """``z = W_L σ(… σ(W_1 x + b_1) …) + b_L`` for ``x`` of shape ``(*B, in_1)``.

    Differentiable (autograd and ``torch.func``; the activation runs in place on the fresh
    output of the affine map, which both allow). A 2-D ``x`` goes straight to
    ``addmm(b, x, Wᵀ)``, other shapes through ``F.linear``.

    Args:
        x: ``(*B, in_1)`` inputs.
        layers: ``((W_1, b_1), …)``.
        activation: ``"tanh"`` or ``"relu"`` (hidden layers only; the last layer is affine).
        inputs: If a list, the input of every layer ``[x, h_1, …, h_{L−1}]`` is appended to
            it (what :func:`jvp` / :func:`vjp` need).
        differentiable: False = values only, run under ``torch.no_grad`` (never inside a
            ``torch.func`` transform): a CPU float tanh then runs in numpy, in place, several
            times faster than ``torch.tanh``. The written-out products (:class:`FlatMLP`,
            :meth:`MLPDistFn.linearize`) use it.

    Returns:
        ``(*B, out_L)``.
    """
    if not differentiable:
        with torch.no_grad():
            return _forward(x, layers, _FAST_IN_PLACE[activation], inputs)
    return _forward(x, layers, _IN_PLACE[activation], inputs)


def _forward(
    x: Tensor, layers: Layers, act: Callable[[Tensor], Tensor], inputs: list[Tensor] | None
) -> Tensor:
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        if inputs is not None:
            inputs.append(x)
        # addmm with a transposed view: the kernel F.linear ends in, without its dispatch.
        x = torch.addmm(b, x, w.t()) if x.ndim == 2 else F.linear(x, w, b)
        if i < last:
            x = act(x)
    return x


def numpy_forward(
    x: np.ndarray, layers: Sequence[tuple[np.ndarray, np.ndarray]], activation: str = "tanh"
) -> np.ndarray:
    """:func:`forward` in numpy: ``x`` ``(N, in_1)``, layers ``(W_l, b_l)`` as numpy arrays.

    Pass the parameters as zero-copy views (``p.detach().numpy()``) to see in-place updates.
    The result equals :func:`forward`'s up to float rounding (BLAS summation order).
    """
    act = _NUMPY[activation]
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < last:
            x = act(x)
    return x


def _derivatives(inputs: Sequence[Tensor], activation: str) -> list[Tensor]:
    """``d_l = σ′`` at every hidden layer, from its output ``h_l = inputs[l]`` (l ≥ 1)."""
    if activation == "tanh":
        return [torch.addcmul(torch.ones_like(h), h, h, value=-1.0) for h in inputs[1:]]
    return [(h > 0).to(h.dtype) for h in inputs[1:]]


# ------------------------------------------------------------------------ J v and Jᵀ u
def jvp(
    inputs: Sequence[Tensor], derivs: Sequence[Tensor], layers: Layers, tangents: Layers
) -> Tensor:
    """``J v``: the directional derivative of :func:`forward`'s output (2-D ``x``).

    Args:
        inputs: ``[x, h_1, …]`` from :func:`forward` (``inputs=``) at the point.
        derivs: ``[d_1, …, d_{L−1}]``, σ′ at the hidden layers (computed once per point).
        layers: The point ``((W_l, b_l))``.
        tangents: The direction ``((V_l, c_l))``, shaped like ``layers``.

    Returns:
        ``(B, out_L)``.
    """
    last = len(layers) - 1
    t: Tensor | None = None
    for i, ((w, _), (vw, vb)) in enumerate(zip(layers, tangents)):
        u = torch.addmm(vb, inputs[i], vw.t())
        if t is not None:
            u = torch.addmm(u, t, w.t())
        t = u.mul_(derivs[i]) if i < last else u
    return t


def _weight_grad(g: Tensor, h: Tensor, out: Tensor | None = None) -> Tensor:
    """``gᵀ h`` ``(out_l, in_l)``. A narrow ``h`` (an input layer of a few observation
    features) goes as ``(hᵀ g)ᵀ``: MKL's gemm takes 2.5-7x longer for the tall-thin product
    than for its transpose (64 x 3 from 1,024 rows: 120 vs 29 µs, one thread)."""
    if h.shape[1] < 16 and h.shape[1] < g.shape[1]:
        product = torch.mm(h.t(), g).t()
        return out.copy_(product) if out is not None else product.contiguous()
    return torch.mm(g.t(), h, out=out) if out is not None else torch.mm(g.t(), h)


def vjp(
    g: Tensor,
    inputs: Sequence[Tensor],
    layers: Layers,
    *,
    activation: str = "tanh",
    derivs: Sequence[Tensor] | None = None,
    out: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``Jᵀ g``: the gradient ``((dW_l, db_l))`` of ``Σ ⟨g, z⟩`` (2-D ``x``), ``g`` ``(B, out_L)``.

    Args:
        g: The cotangent of the output (``∂loss/∂z``).
        inputs: ``[x, h_1, …]`` from :func:`forward` at the point.
        layers: The point ``((W_l, b_l))``.
        activation: σ, used when ``derivs`` is not given (σ′ from the layer outputs).
        derivs: Precomputed σ′ (worth it when many products share one point).
        out: Tensors ``((dW_l, db_l))`` to write the result into (e.g. views of one flat
            gradient); new tensors when None.

    Returns:
        ``((dW_l, db_l))`` (``out`` itself when given).
    """
    grads: list[Any] = list(out) if out is not None else [None] * len(layers)
    backward = _BACKWARD[activation]
    for i in range(len(layers) - 1, -1, -1):
        if out is not None:
            _weight_grad(g, inputs[i], out=out[i][0])
            torch.sum(g, 0, out=out[i][1])
        else:
            grads[i] = (_weight_grad(g, inputs[i]), g.sum(0))
        if i > 0:
            g = torch.mm(g, layers[i][0])
            g = g.mul_(derivs[i - 1]) if derivs is not None else backward(g, inputs[i])
    return grads


# ------------------------------------------------------------------- the fast Fisher
class MLPDistFn:
    """``dist_fn(params, x)``: an MLP's distribution parameters, with written-out ``J``, ``Jᵀ``.

    For :func:`natgrad.curvature.fisher_operator` with ``linearization="custom"``: the
    method :meth:`linearize` returns ``(outputs, v -> J v, u -> Jᵀ u)``. The outputs take
    the structure ``fisher_operator`` expects for ``family``: the MLP output ``z``
    (categorical logits, bernoulli logits), ``(z, params[log_std])`` (diag_gaussian with a
    state-independent ``log σ`` parameter), or ``list(split(z, heads))``
    (multi_categorical). Inputs ``(B, …)`` are flattened to ``(B, in_1)``.

    Args:
        weights: Names of ``W_1, …, W_L`` in the parameter dict.
        biases: Names of ``b_1, …, b_L``.
        activation: ``"tanh"`` or ``"relu"``.
        family: One of :data:`natgrad.curvature.FAMILIES`.
        heads: The sizes of the sub-distributions (multi_categorical only).
        log_std: The name of the ``log σ`` parameter (diag_gaussian only).

    Raises:
        ValueError: Unknown ``activation``/``family``, mismatched names, or a family
            without its ``heads``/``log_std``.
    """

    def __init__(
        self,
        weights: Sequence[str],
        biases: Sequence[str],
        *,
        activation: str = "tanh",
        family: str = "categorical",
        heads: Sequence[int] = (),
        log_std: str | None = None,
    ) -> None:
        _check_activation(activation)
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        if len(weights) != len(biases) or not weights:
            raise ValueError(
                f"weights and biases must name the same number (≥ 1) of layers, got "
                f"{len(weights)} and {len(biases)}"
            )
        if (family == "diag_gaussian") != (log_std is not None):
            raise ValueError("log_std must name the log σ parameter iff family='diag_gaussian'")
        if (family == "multi_categorical") != bool(heads):
            raise ValueError("heads must give the sub-action sizes iff family='multi_categorical'")
        self.weights, self.biases = tuple(weights), tuple(biases)
        self.activation, self.family = activation, family
        self.heads, self.log_std = tuple(int(h) for h in heads), log_std

    @property
    def names(self) -> frozenset[str]:
        """Every parameter name the function reads."""
        extra = (self.log_std,) if self.log_std is not None else ()
        return frozenset((*self.weights, *self.biases, *extra))

    def _layers(self, params: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        return [(params[w], params[b]) for w, b in zip(self.weights, self.biases)]

    def _structure(self, z: Tensor, log_std: Tensor | None) -> Any:
        if self.family == "diag_gaussian":
            return z, log_std
        if self.family == "multi_categorical":
            return list(torch.split(z, self.heads, dim=-1))
        return z

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Any:
        z = forward(x.reshape(x.shape[0], -1), self._layers(params), self.activation)
        return self._structure(z, params[self.log_std] if self.log_std else None)

    def linearize(self, params: Mapping[str, Tensor], x: Tensor) -> tuple[Any, Any, Any]:
        """``(outputs, v -> J v, u -> Jᵀ u)`` at ``params`` on ``x`` (natgrad's protocol);
        ``v`` and the result of ``Jᵀ u`` are dicts like ``params``."""
        layers = self._layers(params)
        log_std = params[self.log_std] if self.log_std else None
        inputs: list[Tensor] = []
        with torch.no_grad():
            z = forward(
                x.reshape(x.shape[0], -1),
                layers,
                self.activation,
                inputs=inputs,
                differentiable=False,
            )
            derivs = _derivatives(inputs, self.activation)
        names = list(zip(self.weights, self.biases))

        def jvp_fn(v: Mapping[str, Tensor]) -> Any:
            t = jvp(inputs, derivs, layers, [(v[w], v[b]) for w, b in names])
            return self._structure(t, v[self.log_std] if self.log_std else None)

        def vjp_fn(u: Any) -> dict[str, Tensor]:
            if self.family == "diag_gaussian":
                u, u_log_std = u
            elif self.family == "multi_categorical":
                u = torch.cat(list(u), dim=-1)
            grads = vjp(u, inputs, layers, derivs=derivs)
            out = {n: t for (w, b), (dw, db) in zip(names, grads) for n, t in ((w, dw), (b, db))}
            if log_std is not None:
                out[self.log_std] = u_log_std.reshape(log_std.shape)
            return out

        return self._structure(z, log_std), jvp_fn, vjp_fn

    def agrees_with(self, reference: Any, params: Mapping[str, Tensor], x: Tensor) -> bool:
        """Whether ``reference(params, x)`` equals this function on up to 8 rows of ``x``
        (``|a − b| ≤ 1e-5 + 1e-4 |b|``): a guard before trusting the written-out products
        for a model whose code is not known to be this MLP. Reads the device (a sync)."""
        probe = x[:8]
        with torch.no_grad():
            ours = torch.utils._pytree.tree_leaves(self(params, probe))
            theirs = torch.utils._pytree.tree_leaves(reference(params, probe))
        return len(ours) == len(theirs) and all(
            a.shape == b.shape and bool(((a - b).abs() <= 1e-5 + 1e-4 * b.abs()).all())
            for a, b in zip(ours, theirs)
        )


def mlp_dist_fn(
    net: nn.Module,
    *,
    family: str = "categorical",
    heads: Sequence[int] = (),
    log_std: str | None = None,
    prefix: str = "",
) -> MLPDistFn | None:
    """The :class:`MLPDistFn` of an ``nn.Sequential`` of ``Linear`` (with bias) layers with
    one ``Tanh`` or ``ReLU`` between consecutive ones (the same activation throughout), or
    ``None`` for any other module (subclasses with their own ``forward`` included).

    ``prefix`` is prepended to the parameter names (``"net."`` for a sub-module ``net``);
    ``family``, ``heads`` and ``log_std`` as in :class:`MLPDistFn`.
    """
    if type(net).forward is not nn.Sequential.forward:
        return None
    modules = list(net.named_children())
    linears, acts = modules[0::2], [type(m) for _, m in modules[1::2]]
    if len(modules) % 2 == 0 or not all(
        type(m) is nn.Linear and m.bias is not None for _, m in linears
    ):
        return None
    kinds = {nn.Tanh: "tanh", nn.ReLU: "relu"}
    if len(set(acts)) > 1 or any(a not in kinds for a in acts):
        return None
    activation = kinds[acts[0]] if acts else "tanh"
    return MLPDistFn(
        [f"{prefix}{name}.weight" for name, _ in linears],
        [f"{prefix}{name}.bias" for name, _ in linears],
        activation=activation,
        family=family,
        heads=heads,
        log_std=log_std,
    )


# ------------------------------------------------------------ flat buffers, fused Adam
AdamOptions = dict[str, float]


def adam_options(
    optimizer: torch.optim.Optimizer | Adam, params: Sequence[Tensor]
) -> AdamOptions | None:
    """``lr``, ``beta1``, ``beta2``, ``eps`` of a plain ``torch.optim.Adam`` or
    :class:`natgrad.adam.Adam` over exactly ``params`` (one group; no weight decay, amsgrad,
    maximize, capturable, differentiable or fused; its state, if any, complete), else None:
    the optimisers :class:`FlatMLP` reproduces exactly."""
    if type(optimizer) not in (torch.optim.Adam, Adam) or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if len(group["params"]) != len(params) or any(
        a is not b for a, b in zip(group["params"], params)
    ):
        return None
    if unsupported_options(group):
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


_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _fused_adam(flat: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: Tensor, **o: float) -> None:
    torch._fused_adam_(
        [flat], [grad], [m], [v], [], [step],
        lr=o["lr"], beta1=o["beta1"], beta2=o["beta2"], eps=o["eps"],
        weight_decay=0.0, amsgrad=False, maximize=False,
    )  # fmt: skip


def fused_adam_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_adam_`` (a private op of torch.optim) runs here: probed once
    per device type and dtype on a one-element problem, so a torch without it (or with a
    different signature) falls back to the explicit formula."""
    key = (torch.device(device).type, dtype)
    if key not in _FUSED_OK:
        try:
            p = torch.zeros(1, dtype=dtype, device=device)
            step = torch.ones((), dtype=torch.float32, device=device)
            _fused_adam(
                p, torch.ones_like(p), torch.zeros_like(p), torch.zeros_like(p), step,
                lr=0.5, beta1=0.9, beta2=0.999, eps=1e-8,
            )  # fmt: skip
            # Adam's first step moves every coordinate by lr·sign(g) (up to eps).
            _FUSED_OK[key] = bool(torch.isclose(p, torch.full_like(p, -0.5)).all())
        except (AttributeError, RuntimeError, TypeError, NotImplementedError):
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


class FlatMLP:
    """An MLP's parameters, gradient and Adam moments as flat buffers with per-layer views.

    Built from the MLP's parameter tensors ``[W_1, b_1, …, W_L, b_L]`` and their plain Adam
    (:func:`adam_options` must accept it); the optimiser state is read in, and
    :meth:`write_back` copies parameters and state back, so later ``optimizer.step()``
    calls and checkpoints continue seamlessly. Between the two, :meth:`forward`,
    :meth:`backward` and :meth:`adam_step` work on the buffers only, without a host sync.

    Raises:
        ValueError: The optimiser is not a plain Adam over exactly ``params``.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        optimizer: torch.optim.Optimizer | Adam,
        activation: str = "tanh",
    ) -> None:
        _check_activation(activation)
        self.params, self.optimizer, self.activation = list(params), optimizer, activation
        options = adam_options(optimizer, self.params)
        if options is None or len(self.params) % 2:
            raise ValueError(
                "optimizer must be a plain torch.optim.Adam or natgrad.adam.Adam over exactly "
                "params"
            )
        self.options = options
        self.sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.grad = torch.zeros_like(self.flat)
        states = [optimizer.state.get(p, {}) for p in self.params]
        self.step = int(float(states[0]["step"])) if all(states) else 0
        if all(states):
            self.exp_avg = torch.cat([s["exp_avg"].reshape(-1) for s in states])
            self.exp_avg_sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
        else:
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.flat), torch.zeros_like(self.flat)
        self.fused = fused_adam_available(self.flat.device, self.flat.dtype)
        # The fused kernel's step count lives on the device: nothing changes on the host
        # between steps, so a loop of them can be recorded as one CUDA graph.
        self.step_t = torch.full((), float(self.step), dtype=torch.float32, device=self.flat.device)
        self.layers = self._views(self.flat)
        self.grads = self._views(self.grad)

    def _views(self, flat: Tensor) -> list[tuple[Tensor, Tensor]]:
        views = [v.view(p.shape) for v, p in zip(torch.split(flat, self.sizes), self.params)]
        return list(zip(views[0::2], views[1::2]))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:func:`forward` of ``x`` ``(k, in_1)``, and the layer inputs :meth:`backward` needs."""
        inputs: list[Tensor] = []
        z = forward(x, self.layers, self.activation, inputs=inputs, differentiable=False)
        return z, inputs

    def backward(self, g: Tensor, inputs: list[Tensor]) -> None:
        """Write ``Jᵀ g`` (the gradient of a loss with ``∂loss/∂z = g``) into :attr:`grad`."""
        vjp(g, inputs, self.layers, activation=self.activation, out=self.grads)

    def adam_step(self) -> None:
        """One step of ``torch.optim.Adam`` on the buffers with the gradient :attr:`grad`.

        The fused kernel (``torch._fused_adam_``, what ``Adam(fused=True)`` runs) where it
        exists; else the single-tensor formula of ``Adam(foreach=False)``, op for op.
        """
        o = self.options
        self.step += 1
        if self.fused:
            self.step_t += 1
            _fused_adam(self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self.step_t, **o)
            return
        adam_update_(self.flat, self.grad, self.exp_avg, self.exp_avg_sq, self.step, **o)

    def set_step(self, step: int) -> None:
        """Set the Adam step count (host and device copies), e.g. after a replayed graph."""
        self.step = int(step)
        self.step_t.fill_(float(step))

    def write_back(self) -> None:
        """Copy the flat parameters and Adam moments into the tensors and optimiser state."""
        split = torch.split
        with torch.no_grad():
            for p, w, m, v in zip(
                self.params,
                split(self.flat, self.sizes),
                split(self.exp_avg, self.sizes),
                split(self.exp_avg_sq, self.sizes),
            ):
                p.copy_(w.view(p.shape))
                p.grad = None
                state = self.optimizer.state[p]
                if "exp_avg" in state:
                    state["exp_avg"].copy_(m.view(p.shape))
                    state["exp_avg_sq"].copy_(v.view(p.shape))
                    state["step"].fill_(float(self.step))
                else:  # as Adam's lazy initialisation creates them
                    state["step"] = torch.tensor(float(self.step), dtype=step_dtype())
                    state["exp_avg"] = m.view(p.shape).clone()
                    state["exp_avg_sq"] = v.view(p.shape).clone()
