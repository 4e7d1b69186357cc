"""hessian_operator on F.mse_loss, whose backward has no usable forward-mode derivative in torch."""

import torch
from torch.func import functional_call

from natgrad.curvature import hessian_operator
from natgrad.params import ParamSpace


def test_hessian_operator_of_mse_loss_matches_dense_hessian():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    net = net.double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    space = ParamSpace(params)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def loss_fn(p, x, y):
        return torch.nn.functional.mse_loss(functional_call(net, p, (x,)), y)

    op = hessian_operator(loss_fn, params, x, y)
    dense = torch.func.hessian(lambda t: loss_fn(space.unravel(t), x, y))(space.ravel(params))
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12)
    v = torch.randn(space.numel, dtype=torch.float64)
    torch.testing.assert_close(op @ v, dense @ v, rtol=1e-10, atol=1e-12)
