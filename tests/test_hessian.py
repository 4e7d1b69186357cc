"""natgrad.hessian: value_grad_hessian and the HVP methods against dense float64 references."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.func import functional_call, hessian

from natgrad.hessian import HESSIAN_METHODS, hessian_operator, value_grad_hessian
from natgrad.params import ParamSpace

DT = torch.float64


def logistic_problem(n=60, d=5, seed=0):
    """L2-regularised logistic regression with badly scaled columns."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=DT, generator=g) * torch.logspace(-2, 2, d, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < 0.5).to(DT)
    w = torch.randn(d, dtype=DT, generator=g) * 0.1

    def f(w, X, y):
        z = X @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5e-2 * w @ w

    return f, w, (X, y)


def test_value_grad_hessian_of_a_tensor_function():
    f, w, args = logistic_problem()
    value, g, H = value_grad_hessian(f, w, *args)
    assert torch.equal(value, f(w, *args))
    torch.testing.assert_close(g, torch.func.grad(f)(w, *args), rtol=1e-13, atol=1e-15)
    dense = hessian(f)(w, *args)
    torch.testing.assert_close(H.to_dense(), dense, rtol=1e-12, atol=1e-15)
    v = torch.randn(5, dtype=DT)
    torch.testing.assert_close(H @ v, dense @ v, rtol=1e-12, atol=1e-15)
    assert H.T is H and value.grad_fn is None and g.grad_fn is None


@pytest.mark.parametrize("method", HESSIAN_METHODS)
def test_hessian_operator_of_a_function_of_one_tensor(method):
    f, w, (X, y) = logistic_problem()
    W = w.reshape(5, 1)  # any shape: the operator acts on W.reshape(-1)
    H = hessian_operator(lambda W, X, y: f(W.reshape(-1), X, y), W, X, y, method=method)
    torch.testing.assert_close(H.to_dense(), hessian(f)(w, X, y), rtol=1e-12, atol=1e-15)
    streamed = hessian_operator(
        lambda W, X, y: f(W.reshape(-1), X, y), W, data=[(X[:25], y[:25]), (X[25:], y[25:])]
    )
    # batch weights 25/60 and 35/60 sum to 1, so the regulariser counts once: the full-data mean
    torch.testing.assert_close(streamed.to_dense(), H.to_dense(), rtol=1e-12, atol=1e-15)


def test_a_bare_tensor_as_params_of_the_mapping_api_says_what_to_pass():
    with pytest.raises(ValueError, match=r"pass \{'x': x\}"):
        ParamSpace(torch.zeros(3))


def test_value_grad_hessian_of_a_matrix_and_of_a_dict():
    A = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))

    def f(M):
        return (torch.tanh(A @ M) ** 2).sum()

    M = torch.randn(3, 2, dtype=DT)
    value, g, H = value_grad_hessian(f, M)
    flat = lambda t: f(t.reshape(3, 2))  # noqa: E731
    torch.testing.assert_close(g, torch.func.grad(flat)(M.reshape(-1)))
    torch.testing.assert_close(H.to_dense(), hessian(flat)(M.reshape(-1)), rtol=1e-12, atol=1e-14)

    params = {"a": M, "b": torch.randn(2, dtype=DT)}
    space = ParamSpace(params)

    def fd(p):
        return f(p["a"]) * torch.exp(p["b"]).sum()

    value, g, H = value_grad_hessian(fd, params)
    dense = hessian(lambda t: fd(space.unravel(t)))(space.ravel(params))
    assert H.space == space
    torch.testing.assert_close(H.to_dense(), dense, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, space.ravel(torch.func.grad(fd)(params)))


def test_value_grad_hessian_errors():
    with pytest.raises(TypeError, match="x must be"):
        value_grad_hessian(lambda x: x, [1.0, 2.0])
    with pytest.raises(ValueError, match="do not depend on params"):
        value_grad_hessian(lambda x: torch.ones((), dtype=DT), torch.ones(2, dtype=DT))
    with pytest.raises(TypeError, match="float32 but params are torch.float64"):
        value_grad_hessian(lambda x, a: (x * a).sum(), torch.ones(2, dtype=DT), torch.ones(2))
    # A linear function has H = 0 (not an error).
    _, g, H = value_grad_hessian(lambda x: 3 * x.sum(), torch.ones(2, dtype=DT))
    assert torch.equal(H.to_dense(), torch.zeros(2, 2, dtype=DT)) and torch.equal(
        g, 3 * g.new_ones(2)
    )


@pytest.mark.parametrize("method", HESSIAN_METHODS)
def test_every_method_on_logistic_and_mlp(method):
    f, w, args = logistic_problem()
    op = hessian_operator(lambda p, X, y: f(p["w"], X, y), {"w": w}, *args, method=method)
    torch.testing.assert_close(op.to_dense(), hessian(f)(w, *args), rtol=1e-12, atol=1e-15)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(DT)
    params = {k: v.detach() for k, v in net.named_parameters()}
    space = ParamSpace(params)
    x, t = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))

    def loss(p, x, t):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (x,)), t)

    op = hessian_operator(loss, params, x, t, method=method)
    dense = hessian(lambda th: loss(space.unravel(th), x, t))(space.ravel(params))
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-11, atol=1e-14)


def test_mse_loss_never_crashes_the_process():
    # torch 2.13 segfaults in linearize(grad(F.mse_loss)) and jvp raises "ZeroTensors are
    # immutable"; no method may take either path to a crash. A subprocess, so that a
    # segfault fails this test instead of killing the test run.
    script = textwrap.dedent(
        """
        import torch
        from torch.func import hessian
        from natgrad.hessian import HESSIAN_METHODS, hessian_operator
        torch.manual_seed(0)
        X, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        w = torch.randn(4, dtype=torch.float64)
        f = lambda w: torch.nn.functional.mse_loss(torch.tanh(X @ w), y)
        dense = hessian(f)(w)
        for m in HESSIAN_METHODS:
            op = hessian_operator(lambda p: f(p["w"]), {"w": w}, method=m)
            torch.testing.assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-14)
        print("ok")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


class Cube(torch.autograd.Function):
    """x³ with a backward that cannot be differentiated again, and a forward-mode rule."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


def test_auto_uses_forward_over_reverse_when_a_once_differentiable_backward_leaves_a_constant_gradient():
    # Naive double backprop returns H = 0 here: the backward of Cube runs without a graph.
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    dense = hessian(lambda t: (t**3).sum())(x)
    op = hessian_operator(lambda p: Cube.apply(p["x"]).sum(), {"x": x})
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="forward_over_reverse"):
        hessian_operator(lambda p: Cube.apply(p["x"]).sum(), {"x": x}, method="double_backprop")
    with pytest.raises(ValueError, match="once_differentiable"):
        value_grad_hessian(lambda x: Cube.apply(x).sum(), x)


@pytest.mark.parametrize("method", HESSIAN_METHODS)
def test_a_once_differentiable_backward_on_a_dependent_gradient_is_refused(method):
    # torch prunes the Error node of the once-differentiable backward when differentiating
    # for the parameters only: a naive double backprop silently gives a wrong, non-symmetric H.
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    with pytest.raises(ValueError, match="silently drops"):
        hessian_operator(
            lambda p: Cube.apply(p["x"]).sum() * (p["x"] ** 2).sum(), {"x": x}, method=method
        ) @ x


class SquareGrad(torch.autograd.Function):
    """2 x g, the backward of Square: forward-mode rule only, no backward of its own."""

    @staticmethod
    def forward(x, g):
        return 2 * x * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, tx, tg):
        x, g = ctx.saved_tensors
        return 2 * (tx * g + x * tg)


class Square(torch.autograd.Function):
    """x² whose backward (SquareGrad) cannot be backpropagated, but can be forward-differentiated."""

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return SquareGrad.apply(x, g)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


def test_auto_falls_back_when_the_first_product_fails():
    # The first double-backward product raises (SquareGrad has no backward); auto
    # switches to forward-over-reverse for that product and all later ones.
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DT)

    def f(p):
        return Square.apply(p["x"]).sum() * p["x"].sum()

    dense = hessian(lambda t: (t**2).sum() * t.sum())(x)
    with pytest.raises(NotImplementedError, match="backward"):
        hessian_operator(f, {"x": x}, method="double_backprop") @ x
    op = hessian_operator(f, {"x": x})
    torch.testing.assert_close(op @ x, dense @ x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-14)


def test_loss_linear_in_params_with_coefficients_that_require_grad():
    # ∇L = a requires grad (through a, not through w): the Hessian in w is still 0.
    a = torch.randn(3, dtype=DT, requires_grad=True)
    for params in (
        {"w": torch.ones(3, dtype=DT)},
        {"w": torch.ones(3, dtype=DT), "b": torch.ones(1, dtype=DT)},
    ):
        op = hessian_operator(
            lambda p: (a * p["w"]).sum() + p.get("b", torch.zeros(1, dtype=DT)).sum() ** 2, params
        )
        dense = torch.zeros(op.shape, dtype=DT)
        if "b" in params:
            dense[3, 3] = 2.0
        torch.testing.assert_close(op.to_dense(), dense, rtol=0, atol=0)
