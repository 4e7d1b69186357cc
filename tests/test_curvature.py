"""Tests for natgrad.curvature: every operator against dense float64 references.

References are built independently of the code under test: ``torch.func.hessian``
of the loss / of a closed-form mean KL on the flat vector, a ``jacrev``-built
``JᵀHJ``, and (categorical) the Fisher as the exact expectation of score outer
products over all actions.
"""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

from natgrad.curvature import (
    FAMILIES,
    HESSIAN_METHODS,
    LINEARIZATIONS,
    fisher_operator,
    ggn_operator,
    hessian_operator,
    kl_hessian_operator,
)
from natgrad.params import ParamSpace

DT = torch.float64
B, OBS, HID = 7, 3, 5


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def mlp(out_dim, seed=0, in_dim=OBS):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, HID), torch.nn.Tanh(), torch.nn.Linear(HID, out_dim)
    ).to(DT)


def net_params(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def inputs(seed=1, batch=B):
    return torch.randn(batch, OBS, dtype=DT, generator=torch.Generator().manual_seed(seed))


def dense_hessian(fn, params, *args):
    """torch.func.hessian of fn on the flat vector (the independent reference)."""
    space = ParamSpace(params)
    return hessian(lambda th: fn(space.unravel(th), *args))(space.ravel(params))


def random_block(n, k=3, seed=5):
    return torch.randn(n, k, dtype=DT, generator=torch.Generator().manual_seed(seed))


def check_operator_basics(op, params):
    """Two applications agree, blocks equal column-wise matvecs, op.space is right."""
    n = op.shape[0]
    assert op.shape == (n, n) and op.dtype == DT
    assert op.space == ParamSpace(params)
    V = random_block(n)
    v = V[:, 0].clone()
    first, second = op @ v, op @ v
    assert torch.equal(first, second)
    block = op @ V
    cols = torch.stack([op @ V[:, j].clone() for j in range(V.shape[1])], dim=1)
    assert torch.allclose(block, cols, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- Hessian
def mlp_loss_setup():
    net = mlp(2)
    params = net_params(net)
    x, y = inputs(), torch.randn(B, 2, dtype=DT, generator=torch.Generator().manual_seed(2))

    def loss(p, x, y):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    return loss, params, (x, y)


def rosenbrock_setup():
    # Split over two parameter tensors to exercise the flat ordering.
    g = torch.Generator().manual_seed(3)
    params = {
        "head": torch.randn(3, dtype=DT, generator=g),
        "tail": torch.randn(4, dtype=DT, generator=g),
    }

    def loss(p):
        x = torch.cat([p["head"], p["tail"]])
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    return loss, params, ()


@pytest.mark.parametrize("method", HESSIAN_METHODS)
@pytest.mark.parametrize("problem", [mlp_loss_setup, rosenbrock_setup])
def test_hessian_operator_matches_dense_hessian(problem, method):
    loss, params, args = problem()
    op = hessian_operator(loss, params, *args, method=method)
    H = dense_hessian(loss, params, *args)
    assert rel_err(op.to_dense(), H) <= 1e-12
    check_operator_basics(op, params)


def test_rosenbrock_hessian_by_hand():
    # f(x, y) = 100 (y − x²)² + (1 − x)²: H = [[1200x² − 400y + 2, −400x], [−400x, 200]].
    x0, y0 = 0.7, -0.3

    def loss(p):
        return 100 * (p["y"] - p["x"] ** 2) ** 2 + (1 - p["x"]) ** 2

    params = {"x": torch.tensor(x0, dtype=DT), "y": torch.tensor(y0, dtype=DT)}
    H = torch.tensor([[1200 * x0**2 - 400 * y0 + 2, -400 * x0], [-400 * x0, 200.0]], dtype=DT)
    assert torch.allclose(hessian_operator(loss, params).to_dense(), H, rtol=1e-13)


def test_hessian_operator_accepts_module_parameters_and_leaves_them_alone():
    net = mlp(2)
    x, y = inputs(), torch.zeros(B, 2, dtype=DT)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}

    def loss(p):
        return ((functional_call(net, p, (x,)) - y) ** 2).mean()

    op = hessian_operator(loss, dict(net.named_parameters()))
    H = dense_hessian(loss, before)
    assert rel_err(op.to_dense(), H) <= 1e-12
    for k, v in net.named_parameters():
        assert torch.equal(v.detach(), before[k]) and v.grad is None


@pytest.mark.parametrize("method", HESSIAN_METHODS)
def test_hessian_operator_rejects_non_scalar_loss_at_construction(method):
    params = {"x": torch.ones(3, dtype=DT)}
    with pytest.raises(ValueError, match="scalar"):
        hessian_operator(lambda p: p["x"] ** 2, params, method=method)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_operator(lambda p: p["x"].sum(), params, method="linearize")


# ---------------------------------------------------------------------------------- GGN
def jacobian_flat(model_fn, params, *args):
    """(outputs.numel(), n) Jacobian by jacrev on the flat vector."""
    space = ParamSpace(params)
    J = jacrev(lambda th: model_fn(space.unravel(th), *args))(space.ravel(params))
    return J.reshape(-1, space.numel)


@pytest.mark.parametrize("linearization", LINEARIZATIONS)
def test_ggn_mse_matches_jacobian_reference(linearization):
    net = mlp(2)
    params, x = net_params(net), inputs()

    def model(p, x):
        return functional_call(net, p, (x,))

    op = ggn_operator(model, params, x, output_hessian="mse", linearization=linearization)
    J = jacobian_flat(model, params, x)
    G = J.T @ J * (2.0 / (B * 2))
    assert rel_err(op.to_dense(), G) <= 1e-12
    assert torch.equal(op.outputs, model(params, x))
    check_operator_basics(op, params)


@pytest.mark.parametrize("linearization", LINEARIZATIONS)
def test_ggn_cross_entropy_matches_jacobian_reference(linearization):
    K = 4
    net = mlp(K)
    params, x = net_params(net), inputs()

    def model(p, x):
        return functional_call(net, p, (x,))

    op = ggn_operator(model, params, x, output_hessian="cross_entropy", linearization=linearization)
    J = jacobian_flat(model, params, x)
    p = torch.softmax(model(params, x), -1)
    H_out = torch.block_diag(*[(torch.diag(pb) - torch.outer(pb, pb)) / B for pb in p])
    assert rel_err(op.to_dense(), J.T @ H_out @ J) <= 1e-12
    check_operator_basics(op, params)


def test_ggn_callable_output_hessian_on_pytree_outputs():
    net = mlp(3)
    params, x = net_params(net), inputs()
    M = torch.randn(2, 2, dtype=DT, generator=torch.Generator().manual_seed(9))
    M = M @ M.T + torch.eye(2, dtype=DT)

    def model(p, x):
        out = functional_call(net, p, (x,))
        return {"a": out[:, :2], "b": out[:, 2]}

    def h_out(z, t):
        # H_out: M on each row of "a", 3·z_b² on "b" (depends on the outputs).
        return {"a": t["a"] @ M, "b": 3 * z["b"] ** 2 * t["b"]}

    op = ggn_operator(model, params, x, output_hessian=h_out)
    J = jacobian_flat(
        lambda p, x: torch.cat([model(p, x)["a"], model(p, x)["b"][:, None]], 1), params, x
    )
    zb = model(params, x)["b"]
    H_rows = [torch.block_diag(M, 3 * zb[i : i + 1, None] ** 2) for i in range(B)]
    assert rel_err(op.to_dense(), J.T @ torch.block_diag(*H_rows) @ J) <= 1e-12
    check_operator_basics(op, params)


@pytest.mark.parametrize("kind", ["mse", "cross_entropy"])
def test_ggn_equals_loss_hessian_for_linear_model(kind):
    # For a linear model the GGN is the exact Hessian of the loss: this pins the
    # documented conventions (F.mse_loss mean over all elements, F.cross_entropy mean over B).
    g = torch.Generator().manual_seed(4)
    params = {
        "W": torch.randn(3, OBS, dtype=DT, generator=g),
        "c": torch.randn(3, dtype=DT, generator=g),
    }
    x = inputs()
    y_reg = torch.randn(B, 3, dtype=DT, generator=g)
    y_cls = torch.randint(0, 3, (B,), generator=g)

    def model(p, x):
        return x @ p["W"].T + p["c"]

    def loss(p, x):
        z = model(p, x)
        return F.mse_loss(z, y_reg) if kind == "mse" else F.cross_entropy(z, y_cls)

    op = ggn_operator(model, params, x, output_hessian=kind)
    assert rel_err(op.to_dense(), dense_hessian(loss, params, x)) <= 1e-12


def test_ggn_validation():
    params = {"w": torch.ones(3, dtype=DT)}
    with pytest.raises(ValueError, match="output_hessian"):
        ggn_operator(lambda p: p["w"] * 2, params, output_hessian="hinge")
    with pytest.raises(ValueError, match="output_hessian"):
        ggn_operator(lambda p: p["w"] * 2, params, output_hessian=3)
    with pytest.raises(ValueError, match="linearization"):
        ggn_operator(lambda p: p["w"] * 2, params, linearization="fast")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        ggn_operator(lambda p: p["w"] * 2, params, output_hessian="cross_entropy")
    with pytest.raises(ValueError, match="single tensor"):
        ggn_operator(lambda p: (p["w"], p["w"]), params, output_hessian="mse")


# ------------------------------------------------------------------------------ Fisher
# Each case: (dist_fn, params, args, mean-KL(params, *args) with the old distribution
# fixed at the given params). The KLs are closed forms written independently.


def categorical_case():
    K = 4
    net = mlp(K)
    params, x = net_params(net), inputs()

    def dist(p, x):
        return functional_call(net, p, (x,))

    logp_old = torch.log_softmax(dist(params, x), -1).detach()

    def kl(p, x):
        return (logp_old.exp() * (logp_old - torch.log_softmax(dist(p, x), -1))).sum(-1).mean()

    return dist, params, (x,), kl


def _gaussian_case(log_std_kind):
    d = 2
    net = mlp(2 * d if log_std_kind == "state" else d)
    params, x = net_params(net), inputs()
    g = torch.Generator().manual_seed(6)
    if log_std_kind == "shared":
        params["log_std"] = 0.3 * torch.randn(d, dtype=DT, generator=g)
    elif log_std_kind == "scalar":
        params["log_std"] = torch.tensor(-0.4, dtype=DT)

    def dist(p, x):
        out = functional_call(net, {k: v for k, v in p.items() if k != "log_std"}, (x,))
        if log_std_kind == "state":
            return out[:, :d], 0.5 * out[:, d:]
        return out, p["log_std"]

    mu_old, ls_old = (t.detach().expand(B, d) for t in dist(params, x))

    def kl(p, x):
        mu, ls = dist(p, x)
        ls = ls.expand_as(mu)
        var_ratio = torch.exp(2 * (ls_old - ls))
        kl_elem = ls - ls_old + 0.5 * (var_ratio + (mu_old - mu) ** 2 * torch.exp(-2 * ls)) - 0.5
        return kl_elem.sum(-1).mean()

    return dist, params, (x,), kl


def multi_categorical_case():
    sizes = (3, 2, 4)
    net = mlp(sum(sizes))
    params, x = net_params(net), inputs()

    def dist(p, x):
        return list(torch.split(functional_call(net, p, (x,)), sizes, dim=-1))

    logp_old = [torch.log_softmax(z, -1).detach() for z in dist(params, x)]

    def kl(p, x):
        total = 0.0
        for lo, z in zip(logp_old, dist(p, x)):
            total = total + (lo.exp() * (lo - torch.log_softmax(z, -1))).sum(-1)
        return total.mean()

    return dist, params, (x,), kl


def bernoulli_case():
    net = mlp(3)
    params, x = net_params(net), inputs()

    def dist(p, x):
        return functional_call(net, p, (x,))

    z_old = dist(params, x).detach()
    p_old = torch.sigmoid(z_old)

    def kl(p, x):
        z = dist(p, x)
        kl_elem = p_old * (F.logsigmoid(z_old) - F.logsigmoid(z)) + (1 - p_old) * (
            F.logsigmoid(-z_old) - F.logsigmoid(-z)
        )
        return kl_elem.sum(-1).mean()

    return dist, params, (x,), kl


FISHER_CASES = {
    "categorical": ("categorical", categorical_case),
    "diag_gaussian_shared": ("diag_gaussian", lambda: _gaussian_case("shared")),
    "diag_gaussian_scalar": ("diag_gaussian", lambda: _gaussian_case("scalar")),
    "diag_gaussian_state": ("diag_gaussian", lambda: _gaussian_case("state")),
    "multi_categorical": ("multi_categorical", multi_categorical_case),
    "bernoulli": ("bernoulli", bernoulli_case),
}


# Every family with the default linearisation; the other two on two families
# (they share all of the family code, so this keeps the file fast).
FISHER_GRID = [(case, "transpose") for case in FISHER_CASES] + [
    (case, lin)
    for case in ("categorical", "diag_gaussian_shared")
    for lin in LINEARIZATIONS
    if lin != "transpose"
]


@pytest.mark.parametrize(("case", "linearization"), FISHER_GRID)
def test_fisher_equals_dense_kl_hessian_and_double_backprop(case, linearization):
    family, make = FISHER_CASES[case]
    dist, params, args, kl = make()
    op = fisher_operator(dist, params, *args, family=family, linearization=linearization)
    H = dense_hessian(kl, params, *args)
    Fd = op.to_dense()
    assert rel_err(Fd, H) <= 1e-10
    ref = kl_hessian_operator(kl, params, *args)
    V = random_block(op.shape[0], k=4)
    for j in range(V.shape[1]):
        assert rel_err(op @ V[:, j].clone(), ref @ V[:, j].clone()) <= 1e-10
    check_operator_basics(op, params)


@pytest.mark.parametrize("case", list(FISHER_CASES))
def test_kl_hessian_operator_matches_dense_hessian(case):
    _, make = FISHER_CASES[case]
    dist, params, args, kl = make()
    op = kl_hessian_operator(kl, params, *args)
    assert rel_err(op.to_dense(), dense_hessian(kl, params, *args)) <= 1e-12
    check_operator_basics(op, params)


def test_categorical_fisher_is_expected_score_outer_product():
    # F = (1/B) Σ_s Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ, enumerating all actions.
    dist, params, (x,), _ = categorical_case()
    space = ParamSpace(params)
    logp = jacrev(lambda th: torch.log_softmax(dist(space.unravel(th), x), -1))(space.ravel(params))
    pi = torch.softmax(dist(params, x), -1)
    F_ref = torch.einsum("sa,sai,saj->ij", pi, logp, logp) / B
    op = fisher_operator(dist, params, x, family="categorical")
    assert rel_err(op.to_dense(), F_ref) <= 1e-12


def test_fisher_outputs_and_constant_log_std():
    # A log_std that is not a parameter contributes nothing (zero Jacobian).
    net = mlp(2)
    params, x = net_params(net), inputs()
    log_std = torch.tensor([0.1, -0.2], dtype=DT)

    def dist(p, x):
        return functional_call(net, p, (x,)), log_std

    op = fisher_operator(dist, params, x, family="diag_gaussian")
    mu = dist(params, x)[0]
    J = jacobian_flat(lambda p, x: dist(p, x)[0], params, x)
    W = torch.exp(-2 * log_std).repeat(B) / B
    assert rel_err(op.to_dense(), J.T @ (W[:, None] * J)) <= 1e-12
    assert torch.equal(op.outputs[0], mu) and torch.equal(op.outputs[1], log_std)


def test_fisher_works_with_scipy_eigsh():
    dist, params, args, kl = FISHER_CASES["diag_gaussian_shared"][1]()
    op = fisher_operator(dist, params, *args, family="diag_gaussian")
    top = spla.eigsh(op.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    dense = torch.linalg.eigvalsh(dense_hessian(kl, params, *args))
    np.testing.assert_allclose(np.sort(top), dense[-2:].numpy(), rtol=1e-9)
    assert dense.min() > -1e-12  # the Fisher is positive semi-definite


def test_kl_hessian_operator_zero_rows_for_unused_parameters():
    params = {"a": torch.tensor([0.3, -0.2], dtype=DT), "unused": torch.ones(3, dtype=DT)}

    def kl(p):
        return (p["a"] ** 4).sum() + 0 * p["unused"].sum()

    op = kl_hessian_operator(kl, params)
    expected = torch.zeros(5, 5, dtype=DT)
    expected[:2, :2] = torch.diag(12 * params["a"] ** 2)
    assert torch.allclose(op.to_dense(), expected, rtol=1e-14, atol=0)
    linear = kl_hessian_operator(lambda p: p["a"].sum(), params)
    assert torch.equal(linear.to_dense(), torch.zeros(5, 5, dtype=DT))


def test_fisher_validation():
    dist, params, args, _ = categorical_case()
    with pytest.raises(ValueError, match="family must be one of") as info:
        fisher_operator(dist, params, *args, family="gaussian")
    for name in FAMILIES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="linearization"):
        fisher_operator(dist, params, *args, family="categorical", linearization="fast")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        fisher_operator(lambda p, x: dist(p, x)[0], params, *args, family="categorical")
    with pytest.raises(ValueError, match="single tensor"):
        fisher_operator(lambda p, x: [dist(p, x)], params, *args, family="bernoulli")
    with pytest.raises(ValueError, match=r"\(mean, log_std\)"):
        fisher_operator(dist, params, *args, family="diag_gaussian")
    with pytest.raises(ValueError, match="broadcastable"):
        fisher_operator(
            lambda p, x: (dist(p, x), dist(p, x)[:, :3]), params, *args, family="diag_gaussian"
        )
    with pytest.raises(ValueError, match="common B"):
        fisher_operator(
            lambda p, x: [dist(p, x), dist(p, x)[:3]], params, *args, family="multi_categorical"
        )
    with pytest.raises(ValueError, match="list/tuple"):
        fisher_operator(dist, params, *args, family="multi_categorical")
    with pytest.raises(ValueError, match="B >= 1"):
        fisher_operator(dist, params, inputs(batch=0), family="bernoulli")


def test_kl_hessian_operator_rejects_non_scalar():
    with pytest.raises(ValueError, match="scalar"):
        kl_hessian_operator(lambda p: p["x"] * 1.0, {"x": torch.ones(2, dtype=DT)})


def test_fisher_accepts_namedtuple_outputs():
    from typing import NamedTuple

    class Normal(NamedTuple):
        mean: torch.Tensor
        log_std: torch.Tensor

    dist, params, args, kl = FISHER_CASES["diag_gaussian_shared"][1]()
    op = fisher_operator(lambda p, x: Normal(*dist(p, x)), params, *args, family="diag_gaussian")
    assert isinstance(op.outputs, Normal)
    assert rel_err(op.to_dense(), dense_hessian(kl, params, *args)) <= 1e-10


def test_operators_work_under_no_grad():
    dist, params, args, kl = FISHER_CASES["categorical"][1]()
    H = dense_hessian(kl, params, *args)
    with torch.no_grad():
        ops = [
            fisher_operator(dist, params, *args, family="categorical"),
            kl_hessian_operator(kl, params, *args),
            hessian_operator(kl, params, *args),
        ]
        for op in ops:
            assert rel_err(op.to_dense(), H) <= 1e-10


@pytest.mark.parametrize("linearization", LINEARIZATIONS)
@pytest.mark.parametrize("case", ["categorical", "diag_gaussian_shared", "multi_categorical"])
def test_fisher_vjp_is_the_gradient_of_a_loss_of_the_outputs(case, linearization):
    # op.vjp(∇_z ℓ) = Jᵀ∇_z ℓ must be ∇_θ ℓ(z(θ)); reference: autograd through the whole
    # function on the flat vector (a different code path from the cached linearisation).
    family, make = FISHER_CASES[case]
    dist, params, args, _ = make()
    op = fisher_operator(dist, params, *args, family=family, linearization=linearization)
    space = ParamSpace(params)
    weights = [
        torch.randn(t.shape, dtype=DT, generator=torch.Generator().manual_seed(11 + i))
        for i, t in enumerate(torch.utils._pytree.tree_leaves(op.outputs))
    ]

    def loss_of_outputs(z):
        leaves = torch.utils._pytree.tree_leaves(z)
        return sum((w * torch.sin(t)).sum() for w, t in zip(weights, leaves))

    grad_z = torch.func.grad(loss_of_outputs)(op.outputs)
    got = op.vjp(grad_z)
    ref = torch.func.grad(lambda th: loss_of_outputs(dist(space.unravel(th), *args)))(
        space.ravel(params)
    )
    assert got.shape == (space.numel,)
    assert float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert hessian_operator(lambda p: sum((v**2).sum() for v in p.values()), params).vjp is None


def test_custom_linearization_uses_the_functions_own_products():
    # A one-hidden-layer tanh MLP with hand-written J / Jᵀ: the "custom"
    # operator must equal the torch.func one, and call the supplied products.
    net = mlp(3)
    params, x = net_params(net), inputs()
    calls = {"jvp": 0, "vjp": 0}

    class HandWritten:
        def __call__(self, p, x):
            return functional_call(net, p, (x,))

        def linearize(self, p, x):
            h_pre = x @ p["0.weight"].T + p["0.bias"]
            h = torch.tanh(h_pre)
            d = 1 - h * h
            z = h @ p["2.weight"].T + p["2.bias"]

            def jvp_fn(v):
                calls["jvp"] += 1
                t = d * (x @ v["0.weight"].T + v["0.bias"])
                return t @ p["2.weight"].T + h @ v["2.weight"].T + v["2.bias"]

            def vjp_fn(u):
                calls["vjp"] += 1
                g = d * (u @ p["2.weight"])
                return {
                    "0.weight": g.T @ x,
                    "0.bias": g.sum(0),
                    "2.weight": u.T @ h,
                    "2.bias": u.sum(0),
                }

            return z, jvp_fn, vjp_fn

    model = HandWritten()
    ours = ggn_operator(model, params, x, linearization="custom")
    ref = ggn_operator(model, params, x)
    torch.testing.assert_close(ours.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-14)
    assert calls["jvp"] > 0 and calls["vjp"] > 0
    fisher = fisher_operator(model, params, x, family="categorical", linearization="custom")
    fisher_ref = fisher_operator(model, params, x, family="categorical")
    torch.testing.assert_close(fisher.to_dense(), fisher_ref.to_dense(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="linearize"):
        ggn_operator(lambda p, x: functional_call(net, p, (x,)), params, x, linearization="custom")


def test_first_operators_in_a_process_do_not_import_heavy_modules():
    # The first operator built in a process used to take 1.5-1.8 s: torch.func's first
    # transform imports torch._dynamo, and autograd.grad's first tensor grad_outputs imports
    # sympy. Neither is needed by the default paths; a structural check (no timing).
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys, torch, natgrad
        from torch.func import functional_call
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        p = {k: v.detach() for k, v in net.named_parameters()}
        x = torch.randn(8, 3)
        f = lambda p, x: functional_call(net, p, (x,))
        v = torch.ones(sum(t.numel() for t in p.values()))
        natgrad.hessian_operator(lambda p, x: f(p, x).pow(2).mean(), p, x) @ v
        natgrad.ggn_operator(f, p, x) @ v
        natgrad.fisher_operator(f, p, x, family="categorical") @ v
        natgrad.value_grad_hessian(lambda w: (w ** 4).sum(), torch.ones(3))[2] @ torch.ones(3)
        natgrad.flat_grad(lambda p, x: f(p, x).pow(2).mean(), p, x)
        natgrad.minimize(lambda w: (w ** 4).sum() + w @ w, torch.ones(3),
                         hvp=lambda w, v: (12 * w ** 2 + 2) * v)
        heavy = [m for m in ("torch._dynamo", "sympy") if m in sys.modules]
        print(heavy)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
