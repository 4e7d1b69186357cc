"""Tests for natgrad.mlp against independent float64 references.

References: ``nn.Sequential`` of ``nn.Linear`` / ``nn.Tanh`` / ``nn.ReLU`` for the forward,
``torch.func.jvp`` / ``torch.func.vjp`` for ``J v`` / ``Jᵀ u``, ``loss.backward()`` for the
flat-buffer backward, ``torch.optim.Adam`` for the fused Adam step, and natgrad's
``fisher_operator`` on ``torch.func`` products (densified) for the written-out Fisher.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from natgrad import mlp
from natgrad.curvature import fisher_operator

DT = torch.float64
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _net(activation="tanh", sizes=(4, 6, 5, 3), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(ACTS[activation]())
    return nn.Sequential(*mods).to(DT)


def _layers(net: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight, m.bias) for m in net if isinstance(m, nn.Linear)]


def _x(n=7, d=4, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _like(tree, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(w.shape, generator=gen, dtype=DT), torch.randn(b.shape, generator=gen, dtype=DT)) for w, b in tree]  # fmt: skip


@pytest.mark.parametrize("activation", list(ACTS))
def test_forward_is_the_sequential_and_numpy_agrees(activation):
    net, x = _net(activation), _x()
    with torch.no_grad():
        want = net(x)
        inputs: list[torch.Tensor] = []
        got = mlp.forward(x, _layers(net), activation, inputs=inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(inputs) == 3 and inputs[0] is x
    torch.testing.assert_close(inputs[2], net[:4](x), rtol=0, atol=0)  # h_2
    # Leading batch dimensions, and gradients by autograd through the in-place activation.
    x3 = x.reshape(7, 1, 4).expand(7, 2, 4)
    torch.testing.assert_close(mlp.forward(x3, _layers(net), activation), net(x3))
    mlp.forward(x, _layers(net), activation).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).pow(2).sum().backward()
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-14, atol=0)
    numpy_layers = [(w.detach().numpy(), b.detach().numpy()) for w, b in _layers(net)]
    np_out = mlp.numpy_forward(x.numpy(), numpy_layers, activation)
    torch.testing.assert_close(torch.as_tensor(np_out), want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", list(ACTS))
def test_values_only_forward_agrees_and_tracks_no_gradient(activation, dtype):
    # differentiable=False runs tanh in numpy, in place: the same values to rounding, the same
    # layer inputs, no autograd graph even when the weights require grad.
    net, x = _net(activation, sizes=(4, 64, 64, 3)).to(dtype), _x(300).to(dtype)
    with torch.no_grad():
        want_inputs: list[torch.Tensor] = []
        want = mlp.forward(x, _layers(net), activation, inputs=want_inputs)
    got_inputs: list[torch.Tensor] = []
    got = mlp.forward(x, _layers(net), activation, inputs=got_inputs, differentiable=False)
    assert not got.requires_grad and got.grad_fn is None
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_inputs, want_inputs):
        torch.testing.assert_close(a, b, **tol)
    # Leading batch dimensions (F.linear), and torch.func's wrapped tensors, which have no
    # numpy view: vmap would raise if they reached numpy.
    x3 = x.reshape(100, 3, 4)
    torch.testing.assert_close(
        mlp.forward(x3, _layers(net), activation, differentiable=False), want.reshape(100, 3, 3),
        **tol,
    )
    vmapped = torch.func.vmap(
        lambda row: mlp.forward(row[None], _layers(net), activation, differentiable=False)[0]
    )(x)
    torch.testing.assert_close(vmapped, want, **tol)


@pytest.mark.parametrize("activation", list(ACTS))
def test_jvp_and_vjp_equal_torch_func(activation):
    net, x = _net(activation), _x()
    layers = [(w.detach(), b.detach()) for w, b in _layers(net)]
    flat = [t for layer in layers for t in layer]

    def f(*params):
        return mlp.forward(x, list(zip(params[0::2], params[1::2])), activation)

    inputs: list[torch.Tensor] = []
    with torch.no_grad():
        mlp.forward(x, layers, activation, inputs=inputs)
    derivs = mlp._derivatives(inputs, activation)
    v = _like(layers, 2)
    _, want_jv = torch.func.jvp(f, tuple(flat), tuple(t for layer in v for t in layer))
    torch.testing.assert_close(mlp.jvp(inputs, derivs, layers, v), want_jv, rtol=1e-13, atol=1e-14)

    u = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    _, vjp_fn = torch.func.vjp(f, *flat)
    want = vjp_fn(u)
    for kwargs in ({"activation": activation}, {"derivs": derivs}):
        got = [t for layer in mlp.vjp(u, inputs, layers, **kwargs) for t in layer]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    # Written into given tensors (views of one flat gradient).
    buf = torch.zeros(sum(t.numel() for t in flat), dtype=DT)
    views = [v.view(t.shape) for v, t in zip(torch.split(buf, [t.numel() for t in flat]), flat)]
    out = list(zip(views[0::2], views[1::2]))
    assert mlp.vjp(u, inputs, layers, activation=activation, out=out) == out
    torch.testing.assert_close(buf, torch.cat([t.reshape(-1) for t in want]), rtol=1e-13, atol=0)


def _dense_fishers(dist, params, x, family):
    ours = fisher_operator(dist, params, x, family=family, linearization="custom")
    ref = fisher_operator(dist.__call__, params, x, family=family)  # torch.func products
    return ours, ref


FAMILY_CASES = {
    "categorical": {},
    "bernoulli": {},
    "multi_categorical": {"heads": (2, 1)},
    "diag_gaussian": {"log_std": "log_std"},
}


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_written_out_fisher_of_a_sequential_equals_torch_func(family, activation):
    net, x = _net(activation), _x()
    dist = mlp.mlp_dist_fn(net, family=family, **FAMILY_CASES[family])
    assert isinstance(dist, mlp.MLPDistFn) and dist.activation == activation
    params = {k: v.detach() for k, v in net.named_parameters()}
    if family == "diag_gaussian":
        params["log_std"] = torch.tensor([0.1, -0.3, 0.2], dtype=DT)
    assert dist.names == frozenset(params)
    with torch.no_grad():  # the function is the network (and its head)
        z = dist(params, x)
        trunk = z[0] if family == "diag_gaussian" else z
        trunk = torch.cat(trunk, -1) if family == "multi_categorical" else trunk
        torch.testing.assert_close(trunk, functional_call(net, params, (x,)), rtol=0, atol=0)
    ours, ref = _dense_fishers(dist, params, x, family)
    dense = ref.to_dense()
    assert float(dense.abs().max()) > 1e-3
    torch.testing.assert_close(ours.to_dense(), dense, rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(5)
    u = torch.utils._pytree.tree_map(
        lambda t: torch.randn(t.shape, generator=gen, dtype=DT), ref.outputs
    )
    torch.testing.assert_close(ours.vjp(u), ref.vjp(u), rtol=1e-12, atol=1e-14)
    assert dist.agrees_with(dist.__call__, params, x)
    assert not dist.agrees_with(lambda p, x: torch.utils._pytree.tree_map(lambda t: 2 * t, dist(p, x)), params, x)  # fmt: skip


class _OwnForward(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def test_mlp_dist_fn_declines_other_modules_and_checks_its_arguments():
    assert mlp.mlp_dist_fn(nn.Linear(3, 2)) is None
    assert mlp.mlp_dist_fn(_OwnForward(nn.Linear(3, 2))) is None
    assert mlp.mlp_dist_fn(nn.Sequential(nn.Linear(3, 2), nn.Tanh())) is None  # ends in σ
    assert mlp.mlp_dist_fn(nn.Sequential(nn.Linear(3, 2, bias=False))) is None
    mixed = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    assert mlp.mlp_dist_fn(mixed) is None
    assert mlp.mlp_dist_fn(nn.Sequential(nn.Linear(3, 2), nn.Sigmoid(), nn.Linear(2, 1))) is None
    single = mlp.mlp_dist_fn(nn.Sequential(nn.Linear(3, 2)), prefix="net.")
    assert single.names == {"net.0.weight", "net.0.bias"}
    with pytest.raises(ValueError, match="log_std"):
        mlp.MLPDistFn(["w"], ["b"], family="diag_gaussian")
    with pytest.raises(ValueError, match="heads"):
        mlp.MLPDistFn(["w"], ["b"], family="multi_categorical")
    with pytest.raises(ValueError, match="activation"):
        mlp.MLPDistFn(["w"], ["b"], activation="gelu")
    with pytest.raises(ValueError, match="family"):
        mlp.MLPDistFn(["w"], ["b"], family="poisson")
    with pytest.raises(ValueError, match="weights and biases"):
        mlp.MLPDistFn(["w", "v"], ["b"])


# ------------------------------------------------------------------------- FlatMLP
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "formula"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_flat_mlp_steps_equal_autograd_and_torch_adam(activation, fused, monkeypatch):
    net, x = _net(activation, sizes=(4, 8, 1)), _x(n=16)
    y = torch.sin(x.sum(-1))
    ref = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.8, 0.95))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.8, 0.95))
    monkeypatch.setitem(mlp._FUSED_OK, ("cpu", DT), fused and mlp.fused_adam_available("cpu", DT))
    for rounds in range(2):  # the second round starts from the written-back Adam state
        flat = mlp.FlatMLP(list(net.parameters()), opt, activation)
        assert flat.step == 3 * rounds
        for _ in range(3):
            with torch.no_grad():
                v, inputs = flat.forward(x)
                diff = v.view(-1) - y
                flat.backward((2 * diff / 16).unsqueeze(1), inputs)  # ∂ mean (v − y)² / ∂v
            loss = (ref(x).view(-1) - y).pow(2).mean()
            ref_opt.zero_grad()
            loss.backward()
            grad = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
            torch.testing.assert_close(flat.grad, grad, rtol=1e-13, atol=1e-15)
            flat.adam_step()
            ref_opt.step()
        flat.write_back()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key])


def test_flat_mlp_accepts_only_a_plain_adam_over_its_parameters():
    net = _net()
    params = list(net.parameters())
    assert mlp.adam_options(torch.optim.Adam(params, lr=0.1), params)["lr"] == 0.1
    for opt in (
        torch.optim.SGD(params, lr=0.1),
        torch.optim.Adam(params, amsgrad=True),
        torch.optim.Adam(params, weight_decay=0.1),
        torch.optim.Adam(params[:2]),
    ):
        assert mlp.adam_options(opt, params) is None
        with pytest.raises(ValueError, match="optimizer"):
            mlp.FlatMLP(params, opt)
