"""natgrad.guards: each way of breaking a curvature operator fails at construction, with advice."""

import itertools

import pytest
import torch
from torch.func import functional_call

from natgrad.curvature import fisher_operator, ggn_operator, hessian_operator
from natgrad.guards import broadcast_shape, broadcasts_to

DT = torch.float64


def make(*layers):
    torch.manual_seed(0)
    net = torch.nn.Sequential(*layers).to(DT)
    return net, {k: v.detach().clone() for k, v in net.named_parameters()}


NET, PARAMS = make(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
X = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))


def ok_model(p, x):
    return functional_call(NET, p, (x,))


# Each builder gets a model function (params, x) -> logits and returns an operator.
BUILDERS = {
    "hessian": lambda f, p, x: hessian_operator(lambda q, x: f(q, x).pow(2).mean(), p, x),
    "hessian_fwd": lambda f, p, x: hessian_operator(
        lambda q, x: f(q, x).pow(2).mean(), p, x, method="forward_over_reverse"
    ),
    "ggn": lambda f, p, x: ggn_operator(f, p, x),
    "ggn_jvp": lambda f, p, x: ggn_operator(f, p, x, linearization="jvp"),
    "fisher": lambda f, p, x: fisher_operator(f, p, x, family="categorical"),
}


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(
    "model",
    [
        lambda p, x: NET(x),  # ignores params, uses the module's own nn.Parameters
        lambda p, x: functional_call(NET, {k: v.detach() for k, v in p.items()}, (x,)),
        lambda p, x: X.sum(1, keepdim=True) * torch.ones(2, dtype=DT),  # constant
    ],
    ids=["ignores_params", "detaches", "constant"],
)
def test_outputs_independent_of_params_raise(builder, model):
    with pytest.raises(ValueError, match="do not depend on params"):
        BUILDERS[builder](model, PARAMS, X)


def test_numpy_outputs_and_numpy_inside_raise_type_error():
    # A dist_fn returning numpy used to fail with "Cannot access data pointer of Tensor".
    for builder in ("ggn", "fisher"):
        with pytest.raises(TypeError, match="must return torch tensors"):
            BUILDERS[builder](lambda p, x: ok_model(p, x).detach().numpy(), PARAMS, X)
    with pytest.raises(TypeError, match="must return a scalar torch tensor"):
        hessian_operator(lambda p, x: ok_model(p, x).pow(2).mean().detach().numpy(), PARAMS, X)
    for builder in BUILDERS:
        with pytest.raises(TypeError, match="to numpy"):
            BUILDERS[builder](lambda p, x: torch.from_numpy(ok_model(p, x).numpy()), PARAMS, X)


@pytest.mark.parametrize("builder", BUILDERS)
def test_mixed_dtypes_raise_type_error_naming_both(builder):
    with pytest.raises(TypeError, match=r"is torch.float32 but params are torch.float64"):
        BUILDERS[builder](ok_model, PARAMS, X.float())
    mixed = {**PARAMS, "0.bias": PARAMS["0.bias"].float()}
    with pytest.raises(ValueError, match="share one dtype"):
        BUILDERS[builder](ok_model, mixed, X)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(
    "layer, what",
    [(lambda: torch.nn.BatchNorm1d(4), "BatchNorm1d"), (lambda: torch.nn.Dropout(0.5), "Dropout")],
)
def test_train_mode_batchnorm_and_dropout_raise_until_eval(builder, layer, what):
    net, params = make(torch.nn.Linear(3, 4), layer(), torch.nn.Linear(4, 2))

    def model(p, x):  # the module is reached through this function's globals/closure
        return functional_call(net, p, (x,))

    with pytest.raises(ValueError, match=rf"{what} .* train mode.*\.eval\(\)"):
        BUILDERS[builder](model, params, X)
    net.eval()
    op = BUILDERS[builder](model, params, X)
    torch.testing.assert_close(op.to_dense(), op.to_dense(), rtol=0, atol=0)  # a fixed map


def test_a_loss_calling_a_model_function_is_followed_to_the_module():
    net, params = make(torch.nn.Linear(3, 4), torch.nn.Dropout(0.2), torch.nn.Linear(4, 2))

    def model(p, x):
        return functional_call(net, p, (x,))

    def loss(p, x):
        return model(p, x).pow(2).mean()

    with pytest.raises(ValueError, match="Dropout"):
        hessian_operator(loss, params, X)


def test_guarded_operators_still_match_the_dense_reference():
    # The checks must not change a valid operator.
    from natgrad.params import ParamSpace

    space = ParamSpace(PARAMS)

    def loss(p, x):
        return ok_model(p, x).pow(2).mean()

    dense = torch.func.hessian(lambda t: loss(space.unravel(t), X))(space.ravel(PARAMS))
    for method in ("auto", "forward_over_reverse"):
        op = hessian_operator(loss, PARAMS, X, method=method)
        torch.testing.assert_close(op.to_dense(), dense, rtol=1e-12, atol=1e-14)


def test_broadcast_shape_matches_torch_broadcast_shapes():
    shapes = [(), (1,), (3,), (2, 3), (2, 1), (1, 3), (4, 2, 3), (4, 1, 1), (5,), (0,), (2, 0)]
    for a, b, c in itertools.product(shapes, repeat=3):
        try:
            expected = torch.broadcast_shapes(a, b, c)
        except RuntimeError:
            with pytest.raises(ValueError, match="do not broadcast"):
                broadcast_shape(a, b, c)
            assert not broadcasts_to(a, b) or torch.broadcast_shapes(a, b) == b
            continue
        assert broadcast_shape(a, b, c) == expected
    assert broadcasts_to((3,), (2, 3)) and broadcasts_to((2, 1), (2, 3))
    assert not broadcasts_to((2, 3), (3,)) and not broadcasts_to((4,), (2, 3))
    assert broadcast_shape() == torch.Size([])
