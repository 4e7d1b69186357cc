"""Tests of natgrad.optim against dense float64 references (solve, torch.func, scipy)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor, nn
from torch.func import functional_call

from natgrad.optim import HessianFree, NaturalGradient, TrustRegionNewton, mean_kl
from natgrad.optim.hessian_free import _Iterates

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny problems: thread start-up and contention cost more than the work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _classification(seed: int = 0, n: int = 200, d: int = 5, k: int = 3):
    g = _gen(seed)
    X = torch.randn(n, d, dtype=F64, generator=g)
    y = (X @ torch.randn(d, k, dtype=F64, generator=g)
         + 0.5 * torch.randn(n, k, dtype=F64, generator=g)).argmax(1)
    return X, y


def _mlp(seed: int, d: int = 5, k: int = 3, h: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k)).double()


# ------------------------------------------------------------------ HessianFree
@pytest.mark.parametrize("preconditioned", [False, True])
def test_hessian_free_first_step_is_damped_gauss_newton_step(preconditioned: bool) -> None:
    # Linear model + MSE: the GGN is 2XᵀX/N (exact), so with decay=0 (no warm start),
    # tight CG and a quadratic loss the step is exactly −(G + λI)⁻¹g (ρ = 1, α = 1). A
    # preconditioner changes the CG path, not the CG solution; but the iterates' Euclidean
    # norms are then not monotone, so backtracking may legitimately keep an earlier one.
    g = _gen(1)
    X = torch.randn(50, 4, dtype=F64, generator=g)
    Y = torch.randn(50, 2, dtype=F64, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 2, bias=False).double()
    theta0 = model.weight.detach().clone()
    d = torch.linspace(0.5, 2.0, 8, dtype=F64)
    opt = HessianFree(model.parameters(), model, loss="mse", damping=0.5, decay=0.0,
                      cg_rtol=1e-12, preconditioner=(lambda r: r / d) if preconditioned else None)
    opt.step(lambda: nn.functional.mse_loss(model(X), Y), X)

    def f(w: Tensor) -> Tensor:
        return nn.functional.mse_loss(X @ w.reshape(2, 4).T, Y)

    H = torch.func.hessian(f)(theta0.reshape(-1))  # = GGN for a linear model
    grad = torch.func.grad(f)(theta0.reshape(-1))
    step = -torch.linalg.solve(H + 0.5 * torch.eye(8, dtype=F64), grad)
    state = opt.state[model.weight]
    torch.testing.assert_close(state["direction"], step)  # the CG solution (warm start)
    if not preconditioned:
        torch.testing.assert_close(model.weight.detach().reshape(-1), theta0.reshape(-1) + step)
        assert state["rho"] == pytest.approx(1.0) and state["alpha"] == 1.0
        assert state["damping"] == pytest.approx(0.5 * 2 / 3)  # ρ > 3/4: λ ← 2λ/3


def test_hessian_free_trains_mlp_and_state_dict_round_trips() -> None:
    X, y = _classification()
    model = _mlp(0)
    opt = HessianFree(model.parameters(), model, damping=1.0, cg_maxiter=30)

    def closure() -> Tensor:
        return nn.functional.cross_entropy(model(X), y)

    with torch.no_grad():
        start = float(closure())
    losses = [float(opt.step(closure, X[:64])) for _ in range(8)]
    assert losses[-1] < 0.5 * start
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))  # never increases
    # A copy continued from the state dict takes exactly the same next step.
    twin = copy.deepcopy(model)
    opt2 = HessianFree(twin.parameters(), twin, damping=123.0, cg_maxiter=30)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[twin[0].weight]["damping"] == opt.state[model[0].weight]["damping"]
    opt.step(closure, X[:64])
    opt2.step(lambda: nn.functional.cross_entropy(twin(X), y), X[:64])
    torch.testing.assert_close(_flat(twin), _flat(model))


def test_hessian_free_fisher_curvature_and_param_group_lr() -> None:
    X, y = _classification(1)
    model = _mlp(1)
    ref = copy.deepcopy(model)
    groups = [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[2].parameters()}]
    opt = HessianFree(groups, model, curvature="fisher", family="categorical", decay=0.0)
    ref_opt = HessianFree(ref.parameters(), ref, curvature="fisher", family="categorical",
                          decay=0.0)
    before = _flat(model)
    opt.step(lambda: nn.functional.cross_entropy(model(X), y), X)
    ref_opt.step(lambda: nn.functional.cross_entropy(ref(X), y), X)
    step, ref_step = _flat(model) - before, _flat(ref) - before
    n0 = sum(p.numel() for p in model[0].parameters())
    # For cross-entropy on logits the Fisher equals the GGN; the first group's step is halved.
    torch.testing.assert_close(step[:n0], 0.5 * ref_step[:n0])
    torch.testing.assert_close(step[n0:], ref_step[n0:])


def test_hessian_free_bad_input() -> None:
    model = _mlp(0)
    X, y = _classification()
    with pytest.raises(ValueError, match="damping"):
        HessianFree(model.parameters(), model, damping=-1.0)
    with pytest.raises(ValueError, match="family"):
        HessianFree(model.parameters(), model, curvature="fisher", family="poisson")
    with pytest.raises(ValueError, match="not parameters of model"):
        HessianFree(nn.Linear(2, 2).parameters(), model)
    opt = HessianFree(model.parameters(), model)
    with pytest.raises(TypeError, match="closure must return the loss"):
        opt.step(lambda: "loss", X)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: nn.functional.cross_entropy(model(X), y, reduction="none"), X)
    with pytest.raises(ValueError, match="inputs of the curvature batch"):
        opt.step(lambda: nn.functional.cross_entropy(model(X), y))
    fisher = HessianFree(model.parameters(), model, curvature="fisher", family="diag_gaussian")
    with pytest.raises(ValueError, match="do not fit family='diag_gaussian'"):
        fisher.step(lambda: nn.functional.cross_entropy(model(X), y), X)


# -------------------------------------------------------------- NaturalGradient
def _kl_hessian(model: nn.Module, X: Tensor) -> Tensor:
    """The Hessian of the mean KL(p_old ‖ p_θ) at θ_old by torch.func.hessian (dense)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = _flat(model)
    old = torch.log_softmax(model(X), -1).detach()

    def kl(t: Tensor) -> Tensor:
        parts, i = {}, 0
        for name, s in zip(names, shapes):
            parts[name] = t[i:i + s.numel()].reshape(s)
            i += s.numel()
        new = torch.log_softmax(functional_call(model, parts, (X,)), -1)
        return (old.exp() * (old - new)).sum(-1).mean()

    return torch.func.hessian(kl)(theta)


def test_natural_gradient_fixed_lr_step_equals_dense_fisher_solve() -> None:
    X, y = _classification(2, n=60)
    model = _mlp(2, h=4)
    theta = _flat(model)
    F = _kl_hessian(model, X)
    grad = torch.func.grad(
        lambda t: nn.functional.cross_entropy(
            functional_call(model, _unflat(model, t), (X,)), y))(theta)
    opt = NaturalGradient(model.parameters(), model, family="categorical", lr=0.3,
                          damping=1e-2, cg_maxiter=200)
    opt.step(lambda: nn.functional.cross_entropy(model(X), y), X)
    expected = theta - 0.3 * torch.linalg.solve(F + 1e-2 * torch.eye(len(theta), dtype=F64), grad)
    torch.testing.assert_close(_flat(model), expected, rtol=1e-6, atol=1e-8)


def _unflat(model: nn.Module, t: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = t[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def test_natural_gradient_empirical_fisher_matches_per_sample_gradients() -> None:
    X, y = _classification(3, n=40)
    model = _mlp(3, h=4)
    theta = _flat(model)

    def per_sample(t: Tensor, x: Tensor, yy: Tensor) -> Tensor:
        logits = functional_call(model, _unflat(model, t), (x[None],))
        return nn.functional.cross_entropy(logits, yy[None])

    G = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0, 0))(theta, X, y)
    F = G.T @ G / len(X)
    opt = NaturalGradient(model.parameters(), model, family="empirical", lr=0.1, damping=0.1,
                          cg_maxiter=200)
    opt.step(lambda: nn.functional.cross_entropy(model(X), y, reduction="none"))
    expected = theta - 0.1 * torch.linalg.solve(F + 0.1 * torch.eye(len(theta), dtype=F64),
                                                G.mean(0))
    torch.testing.assert_close(_flat(model), expected, rtol=1e-6, atol=1e-8)


def test_natural_gradient_kl_trust_region_respects_max_kl() -> None:
    X, y = _classification(4)
    model = _mlp(4)
    opt = NaturalGradient(model.parameters(), model, family="categorical", max_kl=0.01,
                          cg_maxiter=20)

    def closure() -> Tensor:
        return nn.functional.cross_entropy(model(X), y)

    for _ in range(5):
        with torch.no_grad():
            old_logits, before = model(X), float(closure())
        opt.step(closure, X)
        with torch.no_grad():
            kl = float(mean_kl("categorical", old_logits, model(X)))
            after = float(closure())
        state = opt.state[model[0].weight]
        assert state["accepted"] and state["step_status"] == "ok"
        assert kl <= 0.01 and kl == pytest.approx(state["kl"]) and after < before


def test_natural_gradient_kl_radius_adapts_instead_of_stalling() -> None:
    """Full batch, separable data: the predictions become confident, the Fisher vanishes and a
    step of KL max_kl overshoots even after every backtrack. A fixed radius repeats that rejected
    step forever (measured: the loss freezes at 6.0e-5 from step ~12 on); the adaptive radius
    quarters and keeps descending."""
    X = torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] + X[:, 1] > 0).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = NaturalGradient(model.parameters(), model, family="categorical", max_kl=0.05,
                          cg_maxiter=20)

    def closure() -> Tensor:
        return nn.functional.cross_entropy(model(X), y)

    losses, radii = [], []
    for _ in range(60):
        opt.step(closure, X)
        with torch.no_grad():
            losses.append(float(closure()))
        radii.append(opt.state[model[0].weight]["radius"])
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # rejected steps leave θ unchanged
    assert losses[-1] < 0.5 * losses[20]  # still descending long after a fixed radius froze
    assert min(radii) < 0.05 / 16 and max(radii) == 0.05
    assert set(opt.state_dict()["state"][0]) >= {"radius", "accepted", "kl"}


def test_mean_kl_closed_forms() -> None:
    old = torch.tensor([[0.0, 1.0, -1.0]], dtype=F64)
    new = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    p, q = old.softmax(-1), new.softmax(-1)
    torch.testing.assert_close(mean_kl("categorical", old, new), (p * (p / q).log()).sum())
    m0, s0, m1, s1 = (torch.tensor([[v]], dtype=F64) for v in (0.0, 0.0, 1.0, np.log(2.0)))
    # KL(N(0,1) ‖ N(1,4)) = log 2 + (1 + 1)/8 − 1/2
    torch.testing.assert_close(mean_kl("diag_gaussian", (m0, s0), (m1, s1)),
                               torch.tensor(np.log(2.0) + 0.25 - 0.5, dtype=F64))


def test_natural_gradient_bad_input() -> None:
    model = _mlp(0)
    with pytest.raises(ValueError, match="max_kl needs a declared output family"):
        NaturalGradient(model.parameters(), model, family="empirical", max_kl=0.01)
    with pytest.raises(ValueError, match="max_kl"):
        NaturalGradient(model.parameters(), model, family="categorical", max_kl=-1.0)
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(model.parameters(), model, family="categorical", damping=-1.0)
    with pytest.raises(ValueError, match="family"):
        NaturalGradient(model.parameters(), model, family="gamma")
    X, y = _classification()
    opt = NaturalGradient(model.parameters(), model, family="multi_categorical")
    with pytest.raises(ValueError, match="do not fit family='multi_categorical'"):
        opt.step(lambda: nn.functional.cross_entropy(model(X), y), X)
    with pytest.raises(TypeError, match="closure"):
        opt.step(None, X)


# ------------------------------------------------------------ TrustRegionNewton
def test_trust_region_newton_reaches_scipy_optimum_on_logistic_regression() -> None:
    X, y = _classification(5, n=150, d=4, k=2)
    yb = (y == 1).to(F64)
    torch.manual_seed(5)
    model = nn.Linear(4, 1).double()
    opt = TrustRegionNewton(model.parameters(), model, radius=1.0)

    def closure() -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(model(X)[:, 0], yb) + 1e-3 * (
            model.weight**2).sum()

    for _ in range(25):
        opt.step(closure)
    Xn, yn = np.c_[X.numpy(), np.ones(len(X))], yb.numpy()

    def f(w: np.ndarray) -> float:
        z = Xn @ w
        return float(np.mean(np.logaddexp(0, z) - yn * z) + 1e-3 * w[:4] @ w[:4])

    ref = scipy.optimize.minimize(f, np.zeros(5), method="BFGS", options={"gtol": 1e-10})
    torch.testing.assert_close(_flat(model), torch.tensor(ref.x), rtol=1e-5, atol=1e-6)


def test_trust_region_newton_ggn_and_radius_state() -> None:
    X, y = _classification(6)
    model = _mlp(6)
    opt = TrustRegionNewton(model.parameters(), model, curvature="ggn", radius=0.5)

    def closure() -> Tensor:
        return nn.functional.cross_entropy(model(X), y)

    losses = [float(opt.step(closure, X)) for _ in range(6)]
    assert losses[-1] < losses[0] and all(b <= a for a, b in zip(losses, losses[1:]))
    radius = opt.state[model[0].weight]["radius"]
    opt2 = TrustRegionNewton(model.parameters(), model, curvature="ggn")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[model[0].weight]["radius"] == radius


def test_trust_region_newton_bad_input() -> None:
    model = _mlp(0)
    with pytest.raises(ValueError, match="radius"):
        TrustRegionNewton(model.parameters(), model, radius=-1.0)
    with pytest.raises(ValueError, match="max_radius"):
        TrustRegionNewton(model.parameters(), model, radius=10.0, max_radius=1.0)
    with pytest.raises(ValueError, match="eta"):
        TrustRegionNewton(model.parameters(), model, eta=0.3)
    with pytest.raises(ValueError, match="one param group"):
        TrustRegionNewton([{"params": model[0].parameters()},
                           {"params": model[2].parameters()}], model)


def test_cg_iterate_backtracking_walks_back_while_the_loss_decreases() -> None:
    kept = _Iterates(maxiter=10)
    assert sorted(kept.marks) == [1, 2, 3, 4, 5, 7, 9]  # ⌈1.3ʲ⌉ ≤ 10 (Martens §4.6)
    xs = {i: torch.full((2,), float(i), dtype=F64) for i in range(1, 11)}
    for i in range(1, 11):
        kept(type("It", (), {"iteration": i, "x": xs[i], "residual": -xs[i]})())
    # f is smallest at x = 5: from the final iterate (10) back through 9, 7, 5, then 4 is worse.
    losses = []

    def f(x: Tensor) -> float:
        losses.append(float(x[0]))
        return float((x[0] - 5.0) ** 2)

    x, r, fx = kept.backtrack(f, xs[10], -xs[10])
    assert float(x[0]) == 5.0 and torch.equal(r, -xs[5]) and fx == 0.0
    assert losses == [10.0, 9.0, 7.0, 5.0, 4.0]


class _GaussianHead(nn.Module):
    """x -> (mean, log_std) of a diagonal Gaussian, log_std a shared parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 2).double()
        self.log_std = nn.Parameter(torch.zeros(2, dtype=F64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.body(x), self.log_std


def test_natural_gradient_diag_gaussian_regression_with_kl_trust_region() -> None:
    g = _gen(7)
    X = torch.randn(128, 3, dtype=F64, generator=g)
    Y = X @ torch.randn(3, 2, dtype=F64, generator=g) + 0.1 * torch.randn(128, 2, dtype=F64,
                                                                          generator=g)
    torch.manual_seed(7)
    model = _GaussianHead()
    opt = NaturalGradient(model.parameters(), model, family="diag_gaussian", max_kl=0.02)

    def closure() -> Tensor:
        mean, log_std = model(X)
        return -torch.distributions.Normal(mean, log_std.exp()).log_prob(Y).sum(-1).mean()

    for _ in range(3):
        with torch.no_grad():
            old, before = model(X), float(closure())
        opt.step(closure, X)
        with torch.no_grad():
            kl = float(mean_kl("diag_gaussian", old, model(X)))
            assert float(closure()) < before
        assert kl <= 0.02 and opt.state[model.log_std]["accepted"]


def test_trust_region_newton_rejected_step_leaves_parameters_unchanged() -> None:
    # A huge radius on a strongly non-quadratic loss: the first step overshoots (ρ ≤ η), so θ
    # must stay bit for bit and the radius shrink.
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(3.0)
    x = torch.ones(1, 1, dtype=F64)
    opt = TrustRegionNewton(model.parameters(), model, radius=100.0, max_radius=1000.0)

    def closure() -> Tensor:
        w = model(x)[0, 0]
        return torch.log(torch.cosh(w))  # Newton overshoots from |w| > 1.09

    before = model.weight.detach().clone()
    opt.step(closure)
    state = opt.state[model.weight]
    assert state["rho"] <= 0.15 and torch.equal(model.weight.detach(), before)
    assert state["radius"] < 100.0
