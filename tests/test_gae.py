"""Tests for trpo.gae against a hand-computed batch and a slow reference loop."""

from __future__ import annotations

import pytest
import torch

from trpo.gae import LOCAL, compute_gae, normalize_advantages


def _hand_batch():
    # T = 4 steps, N = 2 envs (columns). Env 0 terminates at t = 1, env 1 is
    # truncated (time limit) at t = 2; both start a new episode on the next step.
    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    # V(s'_t): at env 0, t = 1 the final obs of a terminated episode has value 9
    # (must be ignored); at env 1, t = 2 the final obs of the truncated episode has
    # value 4 (must be bootstrapped from).
    next_values = torch.tensor(
        [[1.0, 1.0], [9.0, 1.0], [1.0, 4.0], [3.0, 2.0]], dtype=torch.float64
    )
    term = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    trunc = torch.tensor([[False, False], [False, False], [False, True], [False, False]])
    return rewards, values, next_values, term, trunc


def test_hand_computed_termination_and_truncation():
    # γ = 0.5, λ = 0.5, γλ = 0.25.
    # env 0: δ = [1 + .5·1 − .5, 2 + 0 − 1, 3 + .5·1 − 2, 4 + .5·3 − 1] = [1, 1, 1.5, 4.5]
    #        A3 = 4.5, A2 = 1.5 + .25·4.5 = 2.625, A1 = 1 (terminated), A0 = 1 + .25·1 = 1.25
    # env 1: δ = [0 + .5 − 1, −.5, 1 + .5·4 − 1, 2 + .5·2 − 1] = [−.5, −.5, 2, 2]
    #        A3 = 2, A2 = 2 (truncated: no A3), A1 = −.5 + .25·2 = 0, A0 = −.5 + 0 = −.5
    adv, ret = compute_gae(*_hand_batch(), gamma=0.5, lam=0.5)
    expected = torch.tensor(
        [[1.25, -0.5], [1.0, 0.0], [2.625, 2.0], [4.5, 2.0]], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected + _hand_batch()[1], rtol=0, atol=1e-12)


def test_no_sum_crosses_an_episode_boundary():
    rewards, values, next_values, term, trunc = _hand_batch()
    adv, _ = compute_gae(rewards, values, next_values, term, trunc, gamma=0.9, lam=0.95)
    # Change everything in the episodes that follow the boundaries.
    r2, v2, nv2 = rewards.clone(), values.clone(), next_values.clone()
    r2[2:, 0] += 100.0
    v2[2:, 0] -= 50.0
    nv2[2:, 0] += 7.0
    r2[3, 1] += 100.0
    v2[3, 1] -= 50.0
    nv2[3, 1] += 7.0
    adv2, _ = compute_gae(r2, v2, nv2, term, trunc, gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv2[:2, 0], adv[:2, 0], rtol=0, atol=0)
    torch.testing.assert_close(adv2[:3, 1], adv[:3, 1], rtol=0, atol=0)
    assert not torch.allclose(adv2[2:, 0], adv[2:, 0])


def _reference_gae(rewards, values, next_values, term, trunc, gamma, lam):
    T, N = rewards.shape
    adv = torch.zeros(T, N, dtype=torch.float64)
    for i in range(N):
        running = 0.0
        for t in reversed(range(T)):
            nonterminal = 0.0 if term[t, i] else 1.0
            cont = 0.0 if (term[t, i] or trunc[t, i]) else 1.0
            delta = rewards[t, i] + gamma * nonterminal * next_values[t, i] - values[t, i]
            running = delta + gamma * lam * cont * running
            adv[t, i] = running
    return adv


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 1.0)])
def test_matches_slow_reference_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    T, N = 37, 5
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    next_values = torch.randn(T, N, generator=g, dtype=torch.float64)
    term = torch.rand(T, N, generator=g) < 0.1
    trunc = (torch.rand(T, N, generator=g) < 0.1) & ~term
    adv, ret = compute_gae(rewards, values, next_values, term, trunc, gamma, lam)
    ref = _reference_gae(rewards, values, next_values, term, trunc, gamma, lam)
    torch.testing.assert_close(adv, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref + values, rtol=1e-12, atol=1e-12)
    # Float flags give the same result as bool flags.
    adv_f, _ = compute_gae(rewards, values, next_values, term.double(), trunc.double(), gamma, lam)
    torch.testing.assert_close(adv_f, adv, rtol=0, atol=0)


def test_lambda_one_is_the_monte_carlo_return_minus_baseline():
    # No episode ends: A_t = Σ_k γ^k r_{t+k} + γ^{T−t} V(s'_{T−1}) − V(s_t).
    g = torch.Generator().manual_seed(1)
    T, gamma = 6, 0.8
    rewards = torch.randn(T, 1, generator=g, dtype=torch.float64)
    values = torch.randn(T, 1, generator=g, dtype=torch.float64)
    next_values = torch.cat([values[1:], torch.randn(1, 1, generator=g, dtype=torch.float64)])
    flags = torch.zeros(T, 1, dtype=torch.bool)
    adv, _ = compute_gae(rewards, values, next_values, flags, flags, gamma, 1.0)
    for t in range(T):
        mc = sum(gamma**k * rewards[t + k, 0] for k in range(T - t))
        mc = mc + gamma ** (T - t) * next_values[-1, 0]
        torch.testing.assert_close(adv[t, 0], mc - values[t, 0], rtol=1e-12, atol=1e-12)


def test_float32_dtype_is_kept():
    rewards, values, next_values, term, trunc = (
        x.float() if x.is_floating_point() else x for x in _hand_batch()
    )
    adv, ret = compute_gae(rewards, values, next_values, term, trunc, 0.5, 0.5)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32


def test_bad_arguments():
    batch = _hand_batch()
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(*batch, gamma=0.0, lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(*batch, gamma=0.9, lam=1.5)
    rewards, values, next_values, term, trunc = batch
    with pytest.raises(ValueError, match="next_values"):
        compute_gae(rewards, values, next_values[:3], term, trunc, gamma=0.9, lam=0.5)


def test_normalize_advantages():
    adv = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    out = normalize_advantages(adv)
    torch.testing.assert_close(out.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(out.std(correction=0), torch.tensor(1.0, dtype=torch.float64))
    expected = (adv - 3.0) / (torch.tensor(3.5).sqrt().double() + 1e-8)
    torch.testing.assert_close(out, expected)
    assert torch.equal(normalize_advantages(torch.ones(3)), torch.zeros(3))


def test_normalize_advantages_in_one_process_is_the_plain_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for n in (1, 7, 1000):
            adv = (torch.randn(n, generator=g, dtype=torch.float64) * 30 + 5).to(dtype)
            expected = (adv - adv.mean()) / (adv.std(correction=0) + 1e-8)
            assert torch.equal(normalize_advantages(adv), expected)
            assert torch.equal(normalize_advantages(adv, reducer=LOCAL), expected)


class _TwoRanks:
    """Rank 0's view of a two-rank ``natgrad.distributed.Reducer`` whose rank 1 holds
    ``other``: ``weight(n) = n / (n + n_1)`` and every call of ``mean(x, w)`` returns
    ``w x + (1 − w) x_1``, with ``x_1`` what rank 1 passes in the same call of
    ``normalize_advantages`` (its mean, then its spread about μ)."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other, self.calls, self.global_mean = other, 0, None

    def weight(self, n_local: int) -> float:
        return n_local / (n_local + self.other.numel())

    def mean(self, x: torch.Tensor, weight: float) -> torch.Tensor:
        o = self.other.double()
        if self.calls == 0:
            x1 = o.mean()
        else:
            x1 = o.var(correction=0) + (o.mean() - self.global_mean) ** 2
        self.calls += 1
        out = weight * x + (1.0 - weight) * x1
        if self.calls == 1:
            self.global_mean = out
        return out


def test_normalize_advantages_with_a_reducer_uses_the_moments_of_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(30, generator=g, dtype=torch.float64) * 4 + 2
    b = torch.randn(20, generator=g, dtype=torch.float64) * 0.5 - 3  # other mean and spread
    whole = torch.cat([a, b])
    reference = (whole - whole.mean()) / (whole.std(correction=0) + 1e-8)
    reducer = _TwoRanks(b)
    got = normalize_advantages(a, reducer=reducer)
    assert reducer.calls == 2
    torch.testing.assert_close(got, reference[:30], rtol=1e-12, atol=1e-12)
    # Not what rank 0 alone would give.
    assert not torch.allclose(got, normalize_advantages(a))
