"""Whole TRPO updates: this project's ``policy_step`` / ``fit_critic`` against sb3-contrib's
``TRPO.train()`` on the same sizes, batch and hyperparameters (SB3's defaults: 15 CG
iterations, damping 0.1, δ = 0.01, 10 critic epochs of minibatch 128, Adam 1e-3).

* ``grad``: one surrogate gradient of the actor (the unit of the summary's ``x grad``);
* ``fvp_actor``: one product of the Fisher operator ``policy_step`` builds (written-out
  tanh-MLP products, ``natgrad.mlp`` via ``Actor.written_out_dist_fn``);
* ``policy_step``: gradient, Fisher set-up, 15 CG iterations, step, line search, applied;
* ``fit_critic``: 10 epochs of minibatch 128;
* ``update``: both (the update phase of one TRPO iteration; GAE is not included);
* ``sb3_train``: SB3's ``train()`` on its rollout buffer filled with a batch of the same size;
  its policy-step / critic-loop split is recorded as ``sb3_policy`` / ``sb3_critic``;
* ``*_graphed`` (CUDA only): the same with ``cuda_graph=True`` (recorded once, outside the
  timing, then replayed).

Every round starts from the same parameters and optimiser state (reset outside the timing).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bench_problems import make_sb3_trpo, make_trpo_problem, median

from natgrad.curvature import fisher_operator
from natgrad.params import flat_grad
from trpo.critic import CriticSettings, fit_critic
from trpo.policy import entropy, log_prob
from trpo.update import OldPolicy, PolicyStepSettings, policy_step, surrogate

STEP = PolicyStepSettings(max_kl=0.01, cg_iters=15, cg_damping=0.1)
CRITIC = CriticSettings(epochs=10, minibatch_size=128)


@pytest.fixture
def problem(case, device):
    return make_trpo_problem(case, device)


def _policy_step(p, graphed=False):
    return policy_step(p.actor, p.batch, dataclasses.replace(STEP, cuda_graph=graphed))


def _fit(p, graphed=False):
    return fit_critic(
        p.critic,
        p.optimizer,
        p.batch.obs,
        p.returns,
        dataclasses.replace(CRITIC, cuda_graph=graphed),
        generator=torch.Generator().manual_seed(0),
    )


def _cuda_only(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")


def test_grad(bench, problem):
    p = problem
    params = {k: v.detach() for k, v in p.actor.named_parameters()}
    with torch.no_grad():
        dist = tuple(t.clone() for t in p.actor(p.batch.obs))
        family = "diag_gaussian"
        old = OldPolicy(
            family, dist, log_prob(family, dist, p.batch.actions), entropy(family, dist).mean()
        )

    def loss(q):
        return surrogate(p.actor.functional_dist_params(q, p.batch.obs), p.batch, old)

    bench("grad", lambda: flat_grad(loss, params))


def test_fvp_actor(bench, problem):
    # The Fisher operator policy_step builds for this actor (natgrad.mlp's written-out
    # products when the actor is the plain tanh MLP), one product.
    p = problem
    params = {k: v.detach() for k, v in p.actor.named_parameters()}
    fast = p.actor.written_out_dist_fn(params, p.batch.obs)
    assert fast is not None
    op = fisher_operator(fast, params, p.batch.obs, family="diag_gaussian", linearization="custom")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1)).to(p.device)
    out = bench("fvp_actor", lambda: op @ v)
    ref = fisher_operator(
        p.actor.functional_dist_params, params, p.batch.obs, family="diag_gaussian"
    )
    assert torch.allclose(out, ref @ v, rtol=1e-3, atol=1e-4 * float(out.abs().max()))


def test_policy_step(bench, problem):
    result = bench("policy_step", lambda: _policy_step(problem), setup=problem.reset)
    assert result.applied and result.cg_iterations == STEP.cg_iters


def test_fit_critic(bench, problem):
    result = bench("fit_critic", lambda: _fit(problem), setup=problem.reset)
    assert result.steps == CRITIC.epochs * -(-problem.batch.obs.shape[0] // 128)


def test_update(bench, problem):
    p = problem
    bench("update", lambda: (_policy_step(p), _fit(p)), setup=p.reset)


def test_sb3_train(bench, case, device):
    pytest.importorskip("sb3_contrib")
    model, timer = make_sb3_trpo(case, device)
    bench("sb3_train", timer["train"], setup=timer["reset"])
    splits = timer["splits"][1:]  # without the warm-up call
    bench.record("sb3_policy", median([s[0] for s in splits]))
    bench.record("sb3_critic", median([s[1] for s in splits]))


def test_policy_step_graphed(bench, problem, device):
    _cuda_only(device)
    result = bench("policy_step_graphed", lambda: _policy_step(problem, True), setup=problem.reset)
    assert result.applied and result.cg_iterations == STEP.cg_iters


def test_fit_critic_graphed(bench, problem, device):
    _cuda_only(device)
    bench("fit_critic_graphed", lambda: _fit(problem, True), setup=problem.reset)


def test_update_graphed(bench, problem, device):
    _cuda_only(device)
    p = problem
    bench("update_graphed", lambda: (_policy_step(p, True), _fit(p, True)), setup=p.reset)
