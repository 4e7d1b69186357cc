"""Curvature over a dataset (data=): equals the one-batch operator on the concatenated data."""

import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from natgrad.curvature import fisher_operator, ggn_operator, hessian_operator

DT = torch.float64


def setup(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).to(DT)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    x = torch.randn(n, 3, dtype=DT, generator=g)
    t = torch.randint(0, 4, (n,), generator=g)

    def model(p, x, t=None):
        return functional_call(net, p, (x,))

    def loss(p, x, t):
        return torch.nn.functional.cross_entropy(model(p, x), t)

    return params, x, t, model, loss


def uneven_batches(x, t, sizes=(10, 1, 7, 5)):
    """A list of (x, t) tuples of unequal sizes covering the data once."""
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], t[start : start + s]))
        start += s
    assert start == x.shape[0]
    return out


def assert_same_operator(streamed, full):
    n = full.shape[0]
    torch.testing.assert_close(streamed.to_dense(), full.to_dense(), rtol=1e-12, atol=1e-14)
    V = torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(streamed @ V, full @ V, rtol=1e-12, atol=1e-14)
    assert streamed.outputs is None and streamed.vjp is None


@pytest.mark.parametrize("method", ["auto", "forward_over_reverse"])
def test_hessian_over_uneven_batches_is_the_full_data_hessian(method):
    params, x, t, _, loss = setup()
    data = uneven_batches(x, t)
    full = hessian_operator(loss, params, x, t, method=method)
    assert_same_operator(hessian_operator(loss, params, data=data, method=method), full)


def test_ggn_and_fisher_over_a_dataloader():
    params, x, t, model, _ = setup()
    loader = DataLoader(TensorDataset(x, t), batch_size=6, shuffle=True)
    full = ggn_operator(model, params, x, output_hessian="cross_entropy")
    assert_same_operator(
        ggn_operator(model, params, data=loader, output_hessian="cross_entropy"), full
    )
    # The mse GGN averages over all elements: with equal-width outputs that is the batch weighting.
    full = ggn_operator(model, params, x)
    assert_same_operator(ggn_operator(model, params, data=uneven_batches(x, t)), full)
    full = fisher_operator(model, params, x, family="categorical")
    states = [x[:4], x[4:5], x[5:]]  # tensors as batches: dist_fn(params, batch)
    assert_same_operator(fisher_operator(model, params, data=states, family="categorical"), full)


def test_sum_of_per_batch_operators_is_the_operator_of_the_summed_loss():
    # "Curvature operators of a sum of losses": Σ_b w_b H_b = H(Σ_b w_b L_b).
    params, x, t, _, loss = setup()
    (x1, t1), (x2, t2) = (x[:9], t[:9]), (x[9:], t[9:])
    total = 0.25 * hessian_operator(loss, params, x1, t1) + sum(
        [hessian_operator(loss, params, x2, t2)]
    )
    ref = hessian_operator(lambda p: 0.25 * loss(p, x1, t1) + loss(p, x2, t2), params)
    torch.testing.assert_close(total.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-14)


def test_products_stream_one_batch_at_a_time():
    # Bounded memory: the loss is evaluated batch by batch in each product, never on
    # the whole dataset, and each product is one pass over the data.
    params, x, t, _, loss = setup()
    seen = []

    def counting_loss(p, x, t):
        seen.append(x.shape[0])
        return loss(p, x, t)

    op = hessian_operator(counting_loss, params, data=uneven_batches(x, t))
    seen.clear()
    op @ torch.ones(op.shape[0], dtype=DT)
    assert seen == [10, 1, 7, 5]


def test_data_errors():
    params, x, t, model, loss = setup()
    with pytest.raises(TypeError, match="re-iterable"):
        hessian_operator(loss, params, data=((x, t) for _ in range(2)))
    with pytest.raises(TypeError, match="iterable of batches"):
        ggn_operator(model, params, data=x)
    with pytest.raises(ValueError, match="not both"):
        hessian_operator(loss, params, x, data=[(x, t)])
    with pytest.raises(ValueError, match="at least one batch"):
        fisher_operator(model, params, data=[], family="categorical")
    with pytest.raises(ValueError, match="leading batch dimension"):
        hessian_operator(lambda p, a: loss(p, x, t) * a, params, data=[(2.0,)])
    with pytest.raises(TypeError, match="float32"):
        hessian_operator(loss, params, data=[(x.float(), t)])
    # Later batches are checked when a product reaches them.
    op = hessian_operator(loss, params, data=[(x, t), (x.float(), t)])
    with pytest.raises(TypeError, match="float32"):
        op @ torch.ones(op.shape[0], dtype=DT)
