"""natgrad.families.mask_logits: the categorical restricted to valid actions, in every function
of the family and in the Fisher, against references that never see a masked logit."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from natgrad.curvature import fisher_operator, kl_hessian_operator
from natgrad.families import (
    draw_noise,
    entropy,
    kl_divergence,
    log_prob,
    mask_logits,
    sample_from_noise,
)

DT = torch.float64


def _mask(B: int, K: int, seed: int) -> torch.Tensor:
    """A random mask with at least one valid action per row (the first valid one forced)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, K, generator=g) < 0.5
    m[torch.arange(B), torch.randint(K, (B,), generator=g)] = True
    return m


def _net(K: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, K)
    ).to(DT)


def test_log_prob_entropy_kl_are_those_of_the_renormalised_valid_distribution():
    g = torch.Generator().manual_seed(1)
    B, K = 7, 5
    old, new = torch.randn(B, K, generator=g, dtype=DT), torch.randn(B, K, generator=g, dtype=DT)
    m = _mask(B, K, 2)
    mo, mn = mask_logits(old, m), mask_logits(new, m)
    for b in range(B):
        valid = m[b].nonzero().squeeze(-1)
        p = torch.softmax(old[b, valid], -1)
        q = torch.softmax(new[b, valid], -1)
        ref_entropy = -(p * p.log()).sum()
        ref_kl = (p * (p.log() - q.log())).sum()
        torch.testing.assert_close(entropy("categorical", mo[b : b + 1])[0], ref_entropy)
        torch.testing.assert_close(kl_divergence("categorical", mo[b : b + 1], mn[b : b + 1])[0],
                                   ref_kl)
        for j, a in enumerate(valid):
            lp = log_prob("categorical", mo[b : b + 1], a.view(1))[0]
            torch.testing.assert_close(lp, p[j].log())
        invalid = (~m[b]).nonzero().squeeze(-1)
        for a in invalid:
            assert log_prob("categorical", mo[b : b + 1], a.view(1))[0] == -torch.inf
    assert torch.isfinite(kl_divergence("categorical", mo, mn)).all()
    assert (kl_divergence("categorical", mo, mo) == 0).all()


def test_an_invalid_action_is_never_sampled_and_valid_ones_at_their_rates():
    B, K, T = 4, 6, 20_000
    logits = torch.randn(B, K, generator=torch.Generator().manual_seed(3), dtype=DT)
    m = _mask(B, K, 4)
    ml = mask_logits(logits, m)
    noise = draw_noise("categorical", ml, torch.Generator().manual_seed(5), (T,))
    actions = sample_from_noise("categorical", ml, noise)  # (T, B)
    assert m.gather(1, actions.T).all()  # every one of 80,000 draws is valid
    freq = torch.stack([torch.bincount(actions[:, b], minlength=K) for b in range(B)]).to(DT) / T
    ref = torch.softmax(ml, -1)
    # 4 standard errors of a frequency estimated from 20,000 draws
    assert ((freq - ref).abs() <= 4 * (ref * (1 - ref) / T).sqrt() + 1e-12).all()


def test_fisher_of_the_masked_categorical_is_double_backprop_and_the_restricted_fisher():
    net, B, K = _net(), 9, 5
    obs = torch.randn(B, 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    m = _mask(B, K, 7)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def dist(p, x):
        return mask_logits(functional_call(net, p, (x,)), m)

    old = dist(params, obs).detach()

    def mean_kl(p, x):
        return kl_divergence("categorical", old, dist(p, x)).mean()

    F = fisher_operator(dist, params, obs, family="categorical").to_dense()
    H = kl_hessian_operator(mean_kl, params, obs).to_dense()
    torch.testing.assert_close(F, H, rtol=1e-10, atol=1e-12)
    # The restricted Fisher built by hand: (1/B) Σ_b J_bᵀ (diag(p) − ppᵀ) J_b over valid actions.
    J = torch.func.jacrev(lambda p: functional_call(net, p, (obs,)))(params)
    J = torch.cat([J[k].reshape(B, K, -1) for k in params], dim=-1)  # (B, K, n)
    ref = torch.zeros_like(F)
    for b in range(B):
        v = m[b].nonzero().squeeze(-1)
        p = torch.softmax(old[b, v], -1)
        Jv = J[b, v]
        ref += Jv.T @ (torch.diag(p) - torch.outer(p, p)) @ Jv / B
    torch.testing.assert_close(F, ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(F).all()


def test_multi_categorical_heads_take_the_concatenated_mask():
    g = torch.Generator().manual_seed(8)
    heads = [torch.randn(3, 2, generator=g, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)]
    m = torch.cat([_mask(3, 2, 9), _mask(3, 4, 10)], dim=-1)
    out = mask_logits(heads, m)
    assert isinstance(out, list) and len(out) == 2
    assert torch.equal(out[0].isinf(), ~m[:, :2]) and torch.equal(out[1].isinf(), ~m[:, 2:])
    e = entropy("multi_categorical", out)
    ref = entropy("categorical", out[0]) + entropy("categorical", out[1])
    torch.testing.assert_close(e, ref)


def test_bad_masks_are_refused_with_the_reason():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="boolean"):
        mask_logits(logits, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        mask_logits(logits, torch.ones(2, 4, dtype=torch.bool))
    empty = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="without a valid action"):
        mask_logits(logits, empty)
    heads = [torch.zeros(1, 2), torch.zeros(1, 2)]
    with pytest.raises(ValueError, match="one head"):
        mask_logits(heads, torch.tensor([[True, True, False, False]]))
    # check=False skips the host sync (the caller guarantees a valid action per row)
    assert mask_logits(logits, empty, check=False)[1].isinf().all()
