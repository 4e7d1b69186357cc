"""Tests for natgrad.params: ravel/unravel layout, views, validation, flat_grad."""

import doctest

import pytest
import torch

import natgrad.params
from natgrad.params import ParamSpace, flat_grad

DT = torch.float64


def make_params():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, dtype=DT, generator=g),
        "b": torch.randn(4, dtype=DT, generator=g),
        "s": torch.randn((), dtype=DT, generator=g),
        "e": torch.randn(0, 2, dtype=DT, generator=g),
    }


def test_layout_attributes():
    params = make_params()
    space = ParamSpace(params)
    assert space.names == ("w", "b", "s", "e")
    assert space.shapes == (torch.Size([3, 4]), torch.Size([4]), torch.Size([]), torch.Size([0, 2]))
    assert space.numel == 12 + 4 + 1 + 0
    assert space.offsets == (0, 12, 16, 17, 17)
    assert space.dtype == DT and space.device == torch.device("cpu")
    with pytest.raises(AttributeError):
        space.numel = 3


def test_ravel_order_matches_manual_concatenation():
    params = make_params()
    flat = ParamSpace(params).ravel(params)
    expected = torch.cat([params["w"].flatten(), params["b"], params["s"].reshape(1)])
    assert torch.equal(flat, expected)


def test_round_trip_both_ways():
    params = make_params()
    space = ParamSpace(params)
    flat = space.ravel(params)
    back = space.unravel(flat)
    assert list(back) == list(params)
    for k in params:
        assert back[k].shape == params[k].shape
        assert torch.equal(back[k], params[k])
    v = torch.randn(space.numel, dtype=DT)
    assert torch.equal(space.ravel(space.unravel(v)), v)


def test_unravel_returns_views():
    params = make_params()
    space = ParamSpace(params)
    flat = torch.arange(space.numel, dtype=DT)
    views = space.unravel(flat)
    assert views["w"].data_ptr() == flat.data_ptr()
    assert views["b"].data_ptr() == flat.data_ptr() + 12 * flat.element_size()
    views["b"][2] = -7.0
    assert flat[14] == -7.0
    views["w"].zero_()
    assert torch.all(flat[:12] == 0) and flat[12] == 12.0


def test_unravel_block_gives_trailing_column_dim_as_views():
    params = make_params()
    space = ParamSpace(params)
    V = torch.randn(space.numel, 5, dtype=DT)
    views = space.unravel(V)
    assert views["w"].shape == (3, 4, 5)
    assert views["s"].shape == (5,)
    for j in range(5):
        col = space.unravel(V[:, j].clone())
        for k in params:
            assert torch.equal(views[k][..., j], col[k])
    views["b"][0, 1] = 99.0
    assert V[12, 1] == 99.0
    # A transposed (non-contiguous) block still unravels without copying.
    W = torch.randn(3, space.numel, dtype=DT).T
    assert space.unravel(W)["b"].data_ptr() == W[12:].data_ptr()


def test_space_equality():
    a, b = ParamSpace(make_params()), ParamSpace(make_params())
    assert a == b and hash(a) == hash(b)
    assert a != ParamSpace({"w": torch.zeros(3, 4, dtype=DT)})


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(16, dtype=DT),  # wrong length
        torch.zeros(17, dtype=torch.float32),  # wrong dtype
        torch.zeros(17, 2, 1, dtype=DT),  # wrong ndim
        torch.zeros((), dtype=DT),
    ],
)
def test_unravel_rejects_bad_flat(bad):
    space = ParamSpace(make_params())
    with pytest.raises(ValueError, match="flat"):
        space.unravel(bad)


def test_ravel_rejects_bad_params():
    params = make_params()
    space = ParamSpace(params)
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        space.ravel({k: v for k, v in params.items() if k != "b"})
    with pytest.raises(ValueError, match="unexpected \\['x'\\]"):
        space.ravel({**{k: v for k, v in params.items() if k != "b"}, "x": params["b"]})
    with pytest.raises(ValueError, match="params\\['b'\\]"):
        space.ravel({**params, "b": params["b"].float()})
    with pytest.raises(ValueError, match="params\\['b'\\]"):
        space.ravel({**params, "b": torch.zeros(5, dtype=DT)})


def test_constructor_validation():
    with pytest.raises(ValueError, match="params"):
        ParamSpace({})
    with pytest.raises(ValueError, match="params"):
        ParamSpace({"a": torch.zeros(2), "b": torch.zeros(2, dtype=DT)})
    with pytest.raises(ValueError, match="params\\['a'\\]"):
        ParamSpace({"a": [1.0, 2.0]})


def test_flat_grad_matches_closed_form():
    params = make_params()
    x = torch.randn(5, 3, dtype=DT)

    def fn(p, x):
        return ((x @ p["w"] + p["b"]) ** 2).sum() * p["s"]

    value, g = flat_grad(fn, params, x)
    w, b, s = params["w"], params["b"], params["s"]
    r = x @ w + b
    assert torch.allclose(value, (r**2).sum() * s)
    expected = torch.cat([(2 * s * x.T @ r).flatten(), 2 * s * r.sum(0), (r**2).sum().reshape(1)])
    assert g.shape == (17,)
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-12)


def test_flat_grad_rejects_non_scalar():
    params = make_params()
    with pytest.raises(ValueError, match="scalar"):
        flat_grad(lambda p: p["b"] * 2, params)


def test_docstring_examples():
    assert doctest.testmod(natgrad.params).failed == 0


def test_detached_params_shares_storage_and_leaves_the_graph():
    from natgrad.params import detached_params

    w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    space, detached = detached_params({"w": w, "b": torch.ones(2)})
    assert space == ParamSpace({"w": w, "b": torch.ones(2)})
    assert not detached["w"].requires_grad and detached["w"].data_ptr() == w.data_ptr()
    assert list(detached) == ["w", "b"]


def test_flat_grad_of_a_function_that_ignores_a_parameter_is_zero_there():
    params = {"used": torch.tensor([1.0, 2.0], dtype=torch.float64),
              "unused": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    value, g = flat_grad(lambda p, c: c * (p["used"] ** 2).sum(), params, 3.0)
    assert value.item() == 15.0 and value.grad_fn is None
    torch.testing.assert_close(g, torch.tensor([6.0, 12.0, 0, 0, 0], dtype=torch.float64))
    assert params["unused"].grad is None  # the caller's tensors are never touched
    _, g0 = flat_grad(lambda p: torch.tensor(1.0, dtype=torch.float64), params)
    assert torch.equal(g0, torch.zeros(5, dtype=torch.float64))
