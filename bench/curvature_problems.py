"""Problems for the curvature / HVP benchmarks (issue 10), outside RL.

* ``logistic``: L2-regularised logistic regression, ``N`` examples, ``D = 50`` features with
  column scales ``1e-2 … 1e2`` (log-spaced), float64, ``λ = 1e-3``:
  ``L(w) = mean_i softplus(−y_i x_iᵀw) + λ/2 ‖w‖²`` written as ``BCE-with-logits``;
* ``mlp``: a 64-32-32-10 tanh MLP under the mean cross-entropy on ``N`` digit-like inputs
  (Gaussian, 10 classes), float64.

Each problem gives the loss as a function of a parameter dict and of one batch
(``loss(params, x, y)``), the point ``params``, the data, and a hand-written double-backprop
HVP (the reference of "within 1.2×": gradient graph built once, ``autograd.grad`` per product).
``N`` defaults to 2,000; ``BENCH_CURV_N`` overrides it (e.g. 200 for a quick check).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

__all__ = ["PROBLEMS", "CurvatureProblem", "default_n", "hand_hvp", "make_problem"]

DT = torch.float64
PROBLEMS = ("logistic", "mlp")


def default_n() -> int:
    return int(os.environ.get("BENCH_CURV_N", "2000"))


@dataclass(frozen=True)
class CurvatureProblem:
    name: str
    loss: Callable[..., Tensor]  # loss(params_dict, x, y) -> scalar, a batch mean
    params: dict[str, Tensor]
    x: Tensor
    y: Tensor
    model: Callable[..., Tensor] | None = None  # logits(params, x, y=None), mlp only

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def batches(self, k: int) -> list[tuple[Tensor, Tensor]]:
        """The data split into ``k`` batches (the last one may be smaller)."""
        size = -(-self.x.shape[0] // k)
        return [(self.x[i : i + size], self.y[i : i + size]) for i in range(0, len(self.x), size)]


def _logistic(n: int, d: int = 50, lam: float = 1e-3, seed: int = 0) -> CurvatureProblem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=DT, generator=g) * torch.logspace(-2, 2, d, dtype=DT)
    w_true = torch.randn(d, dtype=DT, generator=g) / torch.logspace(-2, 2, d, dtype=DT)
    y = (torch.rand(n, dtype=DT, generator=g) < torch.sigmoid(x @ w_true)).to(DT)

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        w = p["w"]
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * lam * (w @ w)

    return CurvatureProblem("logistic", loss, {"w": torch.zeros(d, dtype=DT)}, x, y)


def _mlp(n: int, seed: int = 0) -> CurvatureProblem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 10),
    ).to(DT)
    x = torch.randn(n, 64, dtype=DT, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)

    def logits(p: dict[str, Tensor], x: Tensor, y: Tensor | None = None) -> Tensor:
        return functional_call(net, p, (x,))

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits(p, x), y)

    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    return CurvatureProblem("mlp", loss, params, x, y, logits)


def make_problem(name: str, n: int | None = None) -> CurvatureProblem:
    n = default_n() if n is None else n
    return {"logistic": _logistic, "mlp": _mlp}[name](n)


def hand_hvp(problem: CurvatureProblem) -> Callable[[Tensor], Tensor]:
    """The hand-written double-backprop HVP on the flat vector (the 1.2× reference)."""
    leaves = [p.detach().clone().requires_grad_(True) for p in problem.params.values()]
    names = list(problem.params)
    with torch.enable_grad():
        loss = problem.loss(dict(zip(names, leaves)), problem.x, problem.y)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        g = torch.cat([t.reshape(-1) for t in grads])

    def hvp(v: Tensor) -> Tensor:
        parts = torch.autograd.grad(g, leaves, v, retain_graph=True)
        return torch.cat([t.reshape(-1) for t in parts])

    return hvp
