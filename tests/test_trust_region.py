"""Tests of natgrad.trust_region: the natural step and the backtracking line search."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from no_host_sync import NoHostSync
from torch import Tensor

import natgrad.backtracking
import natgrad.trust_region
from natgrad.cg import CG, CGStatus
from natgrad.status import SolverError
from natgrad.trust_region import (
    LineSearchResult,
    LineSearchStatus,
    StepStatus,
    line_search,
    natural_step,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(n: int, lo: float, hi: float, seed: int) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=_gen(seed)))
    A = Q @ torch.diag(torch.linspace(lo, hi, n, dtype=F64)) @ Q.T
    return (A + A.T) / 2


# ---------------------------------------------------------------- natural_step
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_natural_step_lies_on_the_trust_region_boundary(damping: float) -> None:
    H = _spd(12, 0.05, 5.0, 0)
    g = torch.randn(12, dtype=F64, generator=_gen(0))
    delta = 0.01
    st = natural_step(g, H, delta, damping=damping, solver=CG(rtol=1e-12))
    assert st.status is StepStatus.OK and bool(st.ok)
    assert st.cg.status is CGStatus.CONVERGED
    Hd = H + damping * torch.eye(12, dtype=F64)
    assert abs(float(0.5 * st.step @ Hd @ st.step) - delta) <= 1e-6 * delta
    # The seed's closed form sqrt(2δ / gᵀH⁻¹g) H⁻¹g (with the damped H).
    s = torch.linalg.solve(Hd, g)
    ref = math.sqrt(2 * delta / float(g @ s)) * s
    torch.testing.assert_close(st.step, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(st.expected_improvement, g @ ref)
    torch.testing.assert_close(st.expected_improvement, torch.sqrt(2 * delta * (g @ s)))
    torch.testing.assert_close(st.shs, s @ Hd @ s, rtol=1e-9, atol=0)


def test_natural_step_truncated_cg_is_ok_and_on_the_boundary() -> None:
    H = _spd(30, 0.01, 10.0, 1)
    g = torch.randn(30, dtype=F64, generator=_gen(1))
    st = natural_step(g, lambda v: H @ v, 0.02, damping=0.1, solver=CG(rtol=0.0, maxiter=5))
    assert st.cg.status is CGStatus.MAX_ITERATIONS
    assert st.status is StepStatus.OK
    Hd = H + 0.1 * torch.eye(30, dtype=F64)
    torch.testing.assert_close(0.5 * st.step @ Hd @ st.step, torch.tensor(0.02, dtype=F64))
    assert float(st.expected_improvement) > 0


def test_natural_step_accepts_linear_operator() -> None:
    linop = pytest.importorskip("natgrad.linop")
    H = _spd(8, 0.5, 3.0, 2)
    g = torch.randn(8, dtype=F64, generator=_gen(2))
    st = natural_step(g, linop.LinearOperator.from_matrix(H), 0.05, solver=CG(rtol=1e-12))
    ref = natural_step(g, H, 0.05, solver=CG(rtol=1e-12))
    torch.testing.assert_close(st.step, ref.step, rtol=0, atol=1e-14)


@pytest.mark.parametrize("fixed", [False, True])
def test_zero_gradient_gives_zero_step(fixed: bool) -> None:
    H = _spd(6, 1.0, 2.0, 3)
    opts = {"rtol": 0.0, "atol": 0.0, "maxiter": 4} if fixed else {}
    st = natural_step(torch.zeros(6, dtype=F64), H, 0.01, solver=CG(**opts))
    assert st.status is StepStatus.ZERO_GRADIENT and not bool(st.ok)
    assert torch.equal(st.step, torch.zeros(6, dtype=F64))
    assert float(st.expected_improvement) == 0.0 and float(st.scale) == 0.0


@pytest.mark.parametrize(
    "H",
    [
        torch.diag(torch.tensor([1.0, -2.0], dtype=F64)),  # gᵀHg = −1 < 0 at once
        -torch.eye(2, dtype=F64),
        torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=F64))[:2, :2] * 0,  # H = 0: pᵀHp = 0
    ],
    ids=["indefinite", "negative_definite", "zero"],
)
def test_non_positive_curvature_gives_zero_step(H: Tensor) -> None:
    g = torch.ones(2, dtype=F64)
    st = natural_step(g, H, 0.01)
    assert st.status is StepStatus.NON_POSITIVE_CURVATURE and not bool(st.ok)
    assert st.cg.status is CGStatus.NON_POSITIVE_CURVATURE
    assert torch.equal(st.step, torch.zeros(2, dtype=F64))
    assert float(st.expected_improvement) == 0.0


def test_indefinite_after_some_cg_steps_gives_zero_step() -> None:
    # First direction has positive curvature, the second does not (see test_cg).
    H = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=F64))
    st = natural_step(torch.ones(4, dtype=F64), H, 0.01)
    assert int(st.cg.iterations) == 1
    assert st.status is StepStatus.NON_POSITIVE_CURVATURE
    assert torch.equal(st.step, torch.zeros(4, dtype=F64))


def test_non_finite_operator_gives_zero_step_without_nan() -> None:
    st = natural_step(torch.ones(3, dtype=F64), lambda v: v * float("nan"), 0.01)
    assert st.status is StepStatus.NON_FINITE
    assert torch.equal(st.step, torch.zeros(3, dtype=F64))
    assert bool(torch.isfinite(st.expected_improvement))


def test_nan_gradient_raises_or_gives_zero_step() -> None:
    g = torch.tensor([1.0, float("nan")], dtype=F64)
    with pytest.raises(ValueError, match="^g contains NaN"):
        natural_step(g, torch.eye(2, dtype=F64), 0.01)
    st = natural_step(g, torch.eye(2, dtype=F64), 0.01, solver=CG(check_finite=False))
    assert st.status is StepStatus.NON_FINITE
    assert torch.equal(st.step, torch.zeros(2, dtype=F64))


def test_nan_initial_guess_gives_zero_step_not_nan() -> None:
    x0 = torch.full((2,), float("nan"), dtype=F64)
    st = natural_step(
        torch.ones(2, dtype=F64),
        torch.eye(2, dtype=F64),
        0.01,
        x0=x0,
        solver=CG(check_finite=False),
    )
    assert st.status is StepStatus.NON_FINITE
    assert torch.equal(st.step, torch.zeros(2, dtype=F64))
    assert float(st.expected_improvement) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": -0.1}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"delta": float("inf")}, "delta"),
        ({"g": torch.ones(2, 1, dtype=F64)}, "g must be a 1-D"),
        ({"damping": -1.0}, "damping"),
        ({"A": torch.eye(3, dtype=F64)}, "A has shape"),
    ],
)
def test_natural_step_bad_input(kwargs: dict, pattern: str) -> None:
    args = {"g": torch.ones(2, dtype=F64), "A": torch.eye(2, dtype=F64), "delta": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        natural_step(args.pop("g"), args.pop("A"), args.pop("delta"), **args)


def test_natural_step_in_fixed_mode_never_syncs() -> None:
    H = _spd(10, 0.1, 4.0, 4)
    g = torch.randn(10, dtype=F64, generator=_gen(4))
    opts = {"rtol": 0.0, "atol": 0.0, "maxiter": 10, "check_finite": False}
    with NoHostSync():
        st = natural_step(g, lambda v: H @ v, 0.01, damping=0.1, solver=CG(**opts))
        zero = natural_step(torch.zeros(10, dtype=F64), lambda v: H @ v, 0.01, solver=CG(**opts))
        bad = natural_step(g, lambda v: -v, 0.01, solver=CG(**opts))
    assert st.status is StepStatus.OK
    Hd = H + 0.1 * torch.eye(10, dtype=F64)
    torch.testing.assert_close(0.5 * st.step @ Hd @ st.step, torch.tensor(0.01, dtype=F64))
    assert zero.status is StepStatus.ZERO_GRADIENT
    assert bad.status is StepStatus.NON_POSITIVE_CURVATURE
    assert torch.equal(bad.step, torch.zeros(10, dtype=F64))


# ----------------------------------------------------------------- line_search
class Quadratic:
    """f(θ) = gᵀd − ½ c‖d‖² and KL(θ) = ½ dᵀHd with d = θ − θ₀, counting calls."""

    def __init__(self, n: int = 5, c: float = 0.0, seed: int = 5) -> None:
        self.theta0 = torch.randn(n, dtype=F64, generator=_gen(seed))
        self.g = torch.randn(n, dtype=F64, generator=_gen(seed + 1))
        self.H = _spd(n, 0.5, 2.0, seed + 2)
        self.c = c
        self.f_calls = 0
        self.kl_calls = 0

    def objective(self, theta: Tensor) -> Tensor:
        self.f_calls += 1
        d = theta - self.theta0
        return self.g @ d - 0.5 * self.c * (d @ d)

    def kl(self, theta: Tensor) -> Tensor:
        self.kl_calls += 1
        d = theta - self.theta0
        return 0.5 * d @ self.H @ d

    def step_with_kl(self, kl: float) -> Tensor:
        """The natural direction H⁻¹g scaled so that ½ΔᵀHΔ = kl."""
        s = torch.linalg.solve(self.H, self.g)
        return math.sqrt(2 * kl / float(s @ self.H @ s)) * s


def test_full_step_accepted_when_feasible() -> None:
    q = Quadratic()
    step = q.step_with_kl(0.005)
    res = line_search(q.objective, q.kl, q.theta0, step, delta=0.01)
    assert isinstance(res, LineSearchResult)
    assert bool(res.accepted) and int(res.tries) == 1
    assert float(res.step_fraction) == 1.0
    torch.testing.assert_close(res.theta, q.theta0 + step, rtol=0, atol=0)
    torch.testing.assert_close(res.constraint, torch.tensor(0.005, dtype=F64))
    torch.testing.assert_close(res.improvement, q.g @ step)
    assert q.f_calls == 2 and q.kl_calls == 1  # f(θ_old) and one candidate


@pytest.mark.parametrize("shrink", [0.8, 0.5])
def test_shrinks_until_constraint_holds(shrink: float) -> None:
    q = Quadratic()
    delta = 0.01
    step = q.step_with_kl(3.5 * delta)  # KL(t) = 3.5δ t², feasible iff t ≤ 0.53
    k = next(k for k in range(20) if 3.5 * shrink ** (2 * k) <= 1.0)
    assert k > 0
    res = line_search(q.objective, q.kl, q.theta0, step, delta=delta, shrink=shrink)
    assert bool(res.accepted)
    assert int(res.tries) == k + 1
    assert float(res.step_fraction) == shrink**k
    assert float(res.constraint) <= delta
    torch.testing.assert_close(res.theta, q.theta0 + shrink**k * step, rtol=0, atol=0)


def test_constraint_slack_loosens_the_bound() -> None:
    q = Quadratic()
    step = q.step_with_kl(0.012)
    strict = line_search(q.objective, q.kl, q.theta0, step, delta=0.01)
    loose = line_search(q.objective, q.kl, q.theta0, step, delta=0.01, constraint_slack=1.5)
    assert int(strict.tries) == 2 and int(loose.tries) == 1


def test_returns_theta_old_exactly_when_nothing_is_accepted() -> None:
    q = Quadratic()
    step = -q.step_with_kl(0.001)  # downhill: every candidate makes f worse
    res = line_search(q.objective, q.kl, q.theta0, step, delta=0.01, max_tries=6)
    assert not bool(res.accepted)
    assert torch.equal(res.theta, q.theta0)
    assert res.theta.view(torch.int64).equal(q.theta0.view(torch.int64))  # bit for bit
    assert float(res.step_fraction) == 0.0
    assert int(res.tries) == 6 and q.kl_calls == 6
    assert float(res.improvement) < 0  # the last candidate's, for diagnostics


def test_non_finite_candidate_is_rejected() -> None:
    q = Quadratic()
    step = q.step_with_kl(0.002)
    full = q.theta0 + step

    def objective(theta: Tensor) -> Tensor:
        return torch.tensor(torch.nan) if torch.equal(theta, full) else q.objective(theta)

    def kl_inf_at_second(theta: Tensor) -> Tensor:
        return torch.tensor(torch.inf) if torch.equal(theta, q.theta0 + 0.8 * step) else q.kl(theta)

    res = line_search(objective, kl_inf_at_second, q.theta0, step, delta=0.01)
    assert bool(res.accepted) and int(res.tries) == 3
    assert float(res.step_fraction) == 0.8**2
    assert bool(torch.isfinite(res.improvement)) and bool(torch.isfinite(res.constraint))


def test_accept_ratio_uses_the_expected_improvement_at_each_fraction() -> None:
    # f(t) = t·gᵀΔ − ½c t²‖Δ‖²; accepted iff ½c t ‖Δ‖² ≤ (1 − ratio) gᵀΔ.
    q = Quadratic()
    step = q.step_with_kl(0.001)
    expected = float(q.g @ step)
    q.c = 1.5 * expected / float(step @ step)  # full step: improvement = expected / 4
    ratio = 0.5
    t_max = (1 - ratio) * expected / (0.5 * q.c * float(step @ step))
    k = next(k for k in range(30) if 0.8**k <= t_max)
    assert k > 0  # the full step must fail for this test to mean something
    res = line_search(
        q.objective,
        q.kl,
        q.theta0,
        step,
        delta=0.01,
        expected_improvement=expected,
        accept_ratio=ratio,
        max_tries=30,
    )
    assert int(res.tries) == k + 1
    plain = line_search(q.objective, q.kl, q.theta0, step, delta=0.01)
    assert int(plain.tries) == 1  # without the ratio, any improvement is enough


def test_objective_old_saves_an_evaluation_and_floats_are_accepted() -> None:
    q = Quadratic()
    step = q.step_with_kl(0.001)
    res = line_search(
        lambda th: float(q.objective(th)),
        lambda th: float(q.kl(th)),
        q.theta0,
        step,
        delta=0.01,
        objective_old=0.0,
    )
    assert bool(res.accepted) and q.f_calls == 1


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"shrink": 0.0}, "shrink"),
        ({"shrink": 1.0}, "shrink"),
        ({"shrink": 1.5}, "shrink"),
        ({"max_tries": 0}, "max_tries"),
        ({"max_tries": 2.5}, "max_tries"),
        ({"delta": 0.0}, "delta"),
        ({"delta": -1.0}, "delta"),
        ({"accept_ratio": -0.1}, "accept_ratio"),
        ({"constraint_slack": 0.0}, "constraint_slack"),
        ({"step": torch.ones(4, dtype=F64)}, "step must match"),
        ({"step": torch.ones(5, dtype=torch.float32)}, "step must match"),
        ({"theta_old": torch.ones(5, 1, dtype=F64)}, "theta_old"),
    ],
)
def test_line_search_bad_input(kwargs: dict, pattern: str) -> None:
    q = Quadratic()
    args = {"theta_old": q.theta0, "step": q.step_with_kl(0.001), "delta": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        line_search(q.objective, q.kl, args.pop("theta_old"), args.pop("step"), **args)


def test_line_search_rejects_non_scalar_objective() -> None:
    q = Quadratic()
    with pytest.raises(ValueError, match="objective_fn must return a scalar"):
        line_search(lambda th: th, q.kl, q.theta0, q.theta0, delta=0.01)


# ------------------------------------------------------------ batched variant
def _scenarios() -> dict[str, dict]:
    q = Quadratic()
    step = q.step_with_kl(0.001)
    q.c = 1.5 * float(q.g @ step) / float(step @ step)
    return {
        "full_step": {"q": Quadratic(), "kl": 0.005, "kw": {}},
        "shrink": {"q": Quadratic(), "kl": 0.04, "kw": {}},
        "none": {"q": Quadratic(), "kl": -0.001, "kw": {"max_tries": 4}},
        "ratio": {
            "q": q,
            "kl": 0.001,
            "kw": {"expected_improvement": float(q.g @ step), "accept_ratio": 0.5, "max_tries": 30},
        },
        "objective_old": {"q": Quadratic(), "kl": 0.02, "kw": {"objective_old": 0.0}},
    }


@pytest.mark.parametrize("name", list(_scenarios()))
def test_batched_equals_sequential(name: str) -> None:
    sc = _scenarios()[name]
    q: Quadratic = sc["q"]
    kl = sc["kl"]
    step = q.step_with_kl(abs(kl)) * (1 if kl > 0 else -1)
    seq = line_search(q.objective, q.kl, q.theta0, step, delta=0.01, **sc["kw"])
    bat = line_search(
        torch.func.vmap(q.objective),
        torch.func.vmap(q.kl),
        q.theta0,
        step,
        delta=0.01,
        batched=True,
        **sc["kw"],
    )
    assert bool(bat.accepted) == bool(seq.accepted) and bat.status is seq.status
    assert int(bat.tries) == int(seq.tries)
    torch.testing.assert_close(bat.step_fraction, seq.step_fraction, rtol=1e-15, atol=0)
    torch.testing.assert_close(bat.theta, seq.theta, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(bat.improvement, seq.improvement, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bat.constraint, seq.constraint, rtol=1e-12, atol=1e-15)
    if not bool(seq.accepted):
        assert torch.equal(bat.theta, q.theta0)


def test_batched_rejects_non_finite_rows_and_never_syncs() -> None:
    q = Quadratic()
    step = q.step_with_kl(0.002)

    def objective(thetas: Tensor) -> Tensor:  # (m, n) -> (m,); NaN on the full step
        d = thetas - q.theta0
        f = d @ q.g
        return torch.where(torch.isclose(d, step).all(1), torch.nan, f)

    def kl(thetas: Tensor) -> Tensor:
        d = thetas - q.theta0
        return 0.5 * ((d @ q.H) * d).sum(1)

    with NoHostSync():
        res = line_search(objective, kl, q.theta0, step, delta=0.01, batched=True)
        down = line_search(objective, kl, q.theta0, -step, delta=0.01, batched=True)
    assert bool(res.accepted) and int(res.tries) == 2
    assert res.status is LineSearchStatus.ACCEPTED
    assert down.status is LineSearchStatus.NO_IMPROVEMENT  # status codes built on the device
    torch.testing.assert_close(res.theta, q.theta0 + 0.8 * step)


def test_batched_wrong_output_shape_raises() -> None:
    q = Quadratic()
    with pytest.raises(ValueError, match=r"objective_fn must map a \(11, n\) stack"):
        line_search(lambda th: th.sum(), q.kl, q.theta0, q.theta0, delta=0.1, batched=True)


@pytest.mark.parametrize("module", [natgrad.trust_region, natgrad.backtracking])
def test_module_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("maxiter", [3, 6])
def test_natural_step_applies_the_operator_only_inside_cg(maxiter):
    # sᵀ(H + λI)s comes from CG's residual: exactly maxiter products (none more), and it
    # equals the explicit quadratic form (truncated CG: s is not the exact solution).
    H = _spd(6, 0.5, 20.0, 31)
    g = torch.randn(6, dtype=F64, generator=_gen(32))
    calls = []

    def op(v: Tensor) -> Tensor:
        calls.append(1)
        return H @ v

    st = natural_step(g, op, 0.02, damping=0.1, solver=CG(rtol=0.0, maxiter=maxiter))
    assert len(calls) == maxiter
    s = st.cg.x
    explicit = s @ (H + 0.1 * torch.eye(6, dtype=F64)) @ s
    assert float(st.shs) == pytest.approx(float(explicit), rel=1e-12)
    step = st.step
    assert float(0.5 * step @ (H + 0.1 * torch.eye(6, dtype=F64)) @ step) == pytest.approx(
        0.02, rel=1e-12
    )


# ----------------------------------------------------- issue 10: underflow fix
@pytest.mark.parametrize(
    ("dtype", "seed", "maxiter"),
    [(torch.float32, 1, 10), (torch.float64, 0, 40)],
    ids=["f32", "f64"],
)
def test_natural_step_after_early_convergence_is_the_exact_step(dtype, seed, maxiter) -> None:
    # Issue 10's reproduction: a rank-3 Fisher (n = 200, damping 0.1) on which fixed-mode CG
    # converged early and then reported NON_POSITIVE_CURVATURE, giving a zero step.
    g_ = _gen(seed)
    J = torch.randn(3, 200, dtype=F64, generator=g_)
    F = 1e-4 * J.T @ J
    g = torch.randn(200, dtype=F64, generator=g_)
    solver = CG(rtol=0.0, maxiter=maxiter, check_finite=False)
    st = natural_step(g.to(dtype), F.to(dtype), 0.01, damping=0.1, solver=solver)
    assert st.status is StepStatus.OK and st.success
    s = torch.linalg.solve(F + 0.1 * torch.eye(200, dtype=F64), g)
    ref = math.sqrt(2 * 0.01 / float(g @ s)) * s
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(st.step.double(), ref, rtol=0, atol=tol * float(ref.abs().max()))


# ------------------------------------------------ issue 9: names and statuses
def test_delta_and_solver_replace_max_kl_and_cg_options_with_a_warning() -> None:
    H = _spd(5, 0.5, 3.0, 40)
    g = torch.randn(5, dtype=F64, generator=_gen(40))
    new = natural_step(g, H, delta=0.02, damping=0.1, solver=CG(rtol=0.0, maxiter=3))
    with pytest.warns(DeprecationWarning, match=r"natural_step\(max_kl=...\) is deprecated"):
        old_kl = natural_step(g, H, max_kl=0.02, damping=0.1, solver=CG(rtol=0.0, maxiter=3))
    with pytest.warns(DeprecationWarning, match=r"solver=natgrad.CG\(rtol=..., maxiter=...\)"):
        old_opts = natural_step(g, H, 0.02, damping=0.1, rtol=0.0, maxiter=3)
    assert torch.equal(new.step, old_kl.step) and torch.equal(new.step, old_opts.step)
    with pytest.raises(TypeError, match="both 'delta' and its deprecated name 'max_kl'"):
        natural_step(g, H, 0.02, max_kl=0.02)
    with pytest.raises(TypeError, match="missing required argument 'delta'"):
        natural_step(g, H)
    with pytest.raises(TypeError, match="both solver= and CG keywords"):
        natural_step(g, H, 0.02, solver=CG(), maxiter=3)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['maxiters'\\]"):
        natural_step(g, H, 0.02, maxiters=3)


def test_line_search_max_constraint_still_works_with_a_warning() -> None:
    q = Quadratic()
    step = q.step_with_kl(0.005)
    with pytest.warns(DeprecationWarning, match=r"line_search\(max_constraint=...\)"):
        old = line_search(q.objective, q.kl, q.theta0, step, max_constraint=0.01)
    new = line_search(q.objective, q.kl, q.theta0, step, delta=0.01)
    assert torch.equal(old.theta, new.theta) and int(old.tries) == int(new.tries)
    with pytest.raises(TypeError, match="missing required argument 'delta'"):
        line_search(q.objective, q.kl, q.theta0, step)


def test_natural_step_errors_name_g_not_b() -> None:
    # Issue 13 item 18: the message names what the user passed.
    with pytest.raises(ValueError, match="^g contains NaN"):
        natural_step(torch.tensor([1.0, math.nan], dtype=F64), torch.eye(2, dtype=F64), 0.01)
    with pytest.raises(ValueError, match="A has shape \\(3, 3\\), expected \\(2, 2\\) to match g"):
        natural_step(torch.ones(2, dtype=F64), torch.eye(3, dtype=F64), 0.01)
    with pytest.raises(ValueError, match="A has dtype torch.float32 but g has dtype"):
        natural_step(torch.ones(2, dtype=F64), torch.eye(2), 0.01)


def test_natural_step_status_message_and_raise() -> None:
    g = torch.ones(2, dtype=F64)
    ok = natural_step(g, torch.eye(2, dtype=F64), 0.01)
    assert ok.success and ok.raise_if_failed() is ok and "boundary" in ok.message
    zero = natural_step(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), 0.01)
    assert zero.status is StepStatus.ZERO_GRADIENT and zero.success
    bad = natural_step(g, -torch.eye(2, dtype=F64), 0.01)
    assert not bad.success
    # The step's advice, then CG's own diagnosis with its numbers.
    assert bad.message.startswith(StepStatus.NON_POSITIVE_CURVATURE.message)
    assert "CG breakdown after 0 iterations: pᴴ(A + λI)p = -2" in bad.message
    with pytest.raises(SolverError, match="add damping") as info:
        bad.raise_if_failed()
    assert info.value.result is bad


@pytest.mark.parametrize("batched", [False, True])
def test_line_search_status_says_why_nothing_was_accepted(batched: bool) -> None:
    q = Quadratic()
    up = q.step_with_kl(0.005)

    def run(step: Tensor, objective=None, constraint=None, **kw) -> LineSearchResult:
        f = objective or q.objective
        c = constraint or q.kl
        if batched:
            f, c = torch.func.vmap(f), torch.func.vmap(c)
        return line_search(f, c, q.theta0, step, delta=0.01, batched=batched, **kw)

    accepted = run(up)
    assert accepted.status is LineSearchStatus.ACCEPTED and accepted.success
    downhill = run(-up, max_tries=4)
    assert downhill.status is LineSearchStatus.NO_IMPROVEMENT and not downhill.success
    too_far = run(q.step_with_kl(100.0), max_tries=3)  # KL of the smallest: 100·0.8⁴ > δ
    assert too_far.status is LineSearchStatus.CONSTRAINT_VIOLATED
    assert "smallest candidate violated" in too_far.message
    nan = run(up, objective=lambda th: q.objective(th) * math.nan, max_tries=2)
    assert nan.status is LineSearchStatus.NON_FINITE
    with pytest.raises(SolverError, match="NaN/inf objective"):
        nan.raise_if_failed()
    for res in (downhill, too_far, nan):
        assert not bool(res.accepted) and torch.equal(res.theta, q.theta0)
