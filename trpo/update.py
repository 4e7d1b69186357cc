"""The TRPO policy step, in the order of the paper.

Read top to bottom next to Schulman et al. (2015), "Trust Region Policy Optimization", and
docs/theory.md. With π_old the policy that collected the batch:

1. the importance-sampled surrogate (:func:`surrogate`)

       L(θ) = mean_t [ π_θ(a_t|s_t) / π_old(a_t|s_t) · Â_t ],      L(θ_old) = mean Â;

2. its gradient at θ_old, g = ∇_θ L(θ_old) (the vanilla policy gradient);
3. the Fisher H = ∇²_θ D̄_KL(θ_old) of the mean KL (:func:`mean_kl`) at θ_old, as the
   matrix-free operator mean_s J_sᵀ F_out J_s (``natgrad.fisher_operator``) on the same states
   (or a random fraction of them);
4. the natural step Δθ = sqrt(2δ / sᵀ(H+λI)s) · s with s ≈ (H+λI)⁻¹g by CG
   (``natgrad.natural_step``);
5. the backtracking line search θ_old + βᵏΔθ accepting the first point that improves L and
   keeps the exact mean KL ≤ δ (``natgrad.line_search``); if none, θ stays θ_old.

Two things are arranged for speed without changing the mathematics: π_θ is linearised at
θ_old once (step 0 below), and that linearisation gives π_old (its outputs), g (its reverse
pass, ``Jᵀ ∇_z L``) and the Fisher's products; and the step runs without a host sync, so on
CUDA it can be recorded once as a CUDA graph and replayed (:func:`graphed_policy_step`).
Every mean over samples goes through the injected ``reducer``
(:class:`natgrad.distributed.Reducer`): the identity in one process, the global mean over
every process's shard in a data-parallel run. The critic fit is :mod:`trpo.critic`.

Nothing here writes a non-finite number into the parameters: a step is copied into the
actor only when the line search accepted it, and the accepted point is finite by
construction (non-finite candidates are rejected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from natgrad import cuda_graph
from natgrad.cg import CG
from natgrad.curvature import fisher_operator
from natgrad.distributed import LOCAL, Reducer
from natgrad.families import DistParams, entropy, kl_divergence, log_prob, mask_logits
from natgrad.params import ParamSpace, flat_grad
from natgrad.trust_region import LineSearchResult, NaturalStep, line_search, natural_step
from trpo.critic import settings_from_keywords
from trpo.policy import Actor

__all__ = [
    "OldPolicy",
    "PolicyBatch",
    "PolicyStepResult",
    "PolicyStepSettings",
    "PolicyStepTensors",
    "graphed_policy_step",
    "line_search_batched",
    "mean_kl",
    "policy_step",
    "policy_step_tensors",
    "surrogate",
]


@dataclass(frozen=True)
class PolicyBatch:
    """The flattened batch one policy step uses (B = n_envs · n_steps transitions).

    Attributes:
        obs: ``(B, *obs_shape)`` observations as the policy saw them (normalised).
        actions: ``(B, ...)`` actions taken (unclipped samples for Box spaces).
        advantages: ``(B,)`` advantage estimates Â_t (already normalised if configured).
        masks: ``(B, ΣK)`` bool action masks (:mod:`trpo.masks`), or None: π is then the
            categorical restricted to the valid actions everywhere in the step (surrogate,
            KL, Fisher, entropy), via :func:`natgrad.families.mask_logits`.
    """

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    masks: Tensor | None = None


@dataclass(frozen=True)
class PolicyStepSettings:
    """The hyperparameters of one policy step.

    Attributes:
        max_kl: δ, the bound on the mean KL (> 0).
        cg_iters: CG iterations (the maximum when ``cg_rtol > 0``).
        cg_damping: λ in (H + λI)s = g (≥ 0).
        cg_rtol: CG relative tolerance; 0 runs exactly ``cg_iters`` iterations (no sync).
        fvp_fraction: Fraction of the states used for the Fisher, in (0, 1].
        line_search_shrink: β of the backtracking θ_old + βᵏΔθ, in (0, 1).
        line_search_max_tries: Candidates tried (≥ 1).
        line_search_accept_ratio: Required fraction of the expected improvement (≥ 0).
        cuda_graph: On CUDA, run the whole step as one CUDA graph, recorded at the first
            call for these shapes and settings and replayed afterwards. Needs
            ``cg_rtol = 0``, ``fvp_fraction = 1`` and one process; otherwise, or if
            recording fails, the eager step runs.
    """

    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 0.1
    cg_rtol: float = 0.0
    fvp_fraction: float = 1.0
    line_search_shrink: float = 0.8
    line_search_max_tries: int = 10
    line_search_accept_ratio: float = 0.0
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        checks = {
            "max_kl": self.max_kl > 0,
            "cg_damping": self.cg_damping >= 0,
            "cg_rtol": self.cg_rtol >= 0,
            "fvp_fraction": 0 < self.fvp_fraction <= 1,
            "line_search_shrink": 0 < self.line_search_shrink < 1,
            "line_search_accept_ratio": self.line_search_accept_ratio >= 0,
            "cg_iters": self.cg_iters >= 1,
            "line_search_max_tries": self.line_search_max_tries >= 1,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not (ok and math.isfinite(value)) or isinstance(value, bool):
                raise ValueError(f"{name} is out of range: got {value!r}")
        for name in ("cg_iters", "line_search_max_tries"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: Any) -> PolicyStepSettings:
        """From a :class:`~trpo.config.TRPOConfig` or any object with the same-named fields."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PolicyStepResult:
    """What one trust-region policy step decided (Python numbers, for logging).

    Attributes:
        applied: The line search accepted a point and it was written into the actor.
        status: ``natural_step``'s status name (``OK``, ``ZERO_GRADIENT``, ...).
        kl: Exact mean KL(π_old‖π_new) at the accepted point (0 when not applied).
        surrogate_improvement: L(θ_new) − L(θ_old) (0 when not applied).
        expected_improvement: gᵀΔθ of the full step (linear model).
        step_fraction: βᵏ of the accepted candidate (0 when not applied).
        line_search_tries: Candidates evaluated.
        cg_iterations: CG iterations done.
        cg_residual: ‖r‖ / ‖g‖ of the CG solve (relative residual).
        grad_norm: ‖g‖.
        step_norm: ‖θ_new − θ_old‖.
        entropy: Mean policy entropy at θ_old over the batch.
    """

    applied: bool
    status: str
    kl: float
    surrogate_improvement: float
    expected_improvement: float
    step_fraction: float
    line_search_tries: int
    cg_iterations: int
    cg_residual: float
    grad_norm: float
    step_norm: float
    entropy: float


@dataclass(frozen=True)
class OldPolicy:
    """π_old on the batch, fixed for the whole step (so the ratios are exactly 1 at θ_old).

    Attributes:
        family: The actor's distribution family.
        dist: π_old's distribution parameters on the batch states (detached copies).
        log_prob: ``(B,)`` log π_old(a_t|s_t).
        entropy: Mean entropy of π_old over the batch (0-d).
    """

    family: str
    dist: DistParams
    log_prob: Tensor
    entropy: Tensor


def surrogate(dist: DistParams, batch: PolicyBatch, old: OldPolicy) -> Tensor:
    """(1) L = mean_t [ exp(log π(a_t|s_t) − log π_old(a_t|s_t)) · Â_t ], a 0-d tensor, for
    π given by its distribution parameters ``dist`` on the batch states (for π_θ:
    ``actor.functional_dist_params(θ, batch.obs)``)."""
    ratio = torch.exp(log_prob(old.family, dist, batch.actions) - old.log_prob)
    return (ratio * batch.advantages).mean()


def mean_kl(dist: DistParams, old: OldPolicy) -> Tensor:
    """(3, 5) D̄_KL = mean_s KL(π_old(·|s) ‖ π(·|s)) in closed form, a 0-d tensor, for π given
    by its distribution parameters ``dist`` on the states of ``old``. Its Hessian at θ_old
    is the Fisher H; the line search bounds it by δ."""
    return kl_divergence(old.family, old.dist, dist).mean()


@dataclass(frozen=True)
class PolicyStepTensors:
    """The device-side outcome of :func:`policy_step_tensors` (nothing read on the host).

    Attributes:
        theta: ``(n,)`` the new flat parameters (θ_old bit for bit when rejected).
        stats: ``(12,)`` float64: accepted, L(θ_old) finite, KL, improvement, expected
            improvement, step fraction, tries, CG iterations, CG residual, ‖g‖, ‖Δθ‖, entropy.
        step: The :class:`~natgrad.trust_region.NaturalStep` (its status is read from it).
        space: The :class:`ParamSpace` of the actor's parameters.
    """

    theta: Tensor
    stats: Tensor
    step: NaturalStep
    space: ParamSpace


# ------------------------------------------------------------------------- the step
def policy_step(
    actor: Actor,
    batch: PolicyBatch,
    settings: PolicyStepSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    reducer: Reducer = LOCAL,
    **legacy: Any,
) -> PolicyStepResult:
    """One trust-region step of the actor, in place (only if the line search accepts).

    Args:
        actor: The policy π_θ; its parameters are θ_old on entry.
        batch: States, actions and advantages collected by π_old (this process's shard).
        settings: A :class:`PolicyStepSettings`. (The keywords of its fields and
            ``distributed=`` still work and warn: deprecated.)
        generator: RNG of the Fisher's subsample (``fvp_fraction < 1``).
        reducer: The cross-process reduction. Data parallel: every mean over samples (L,
            g, each Fisher-vector product, the line-search L and KL, the entropy) is the
            sample-count-weighted mean over all processes, so each takes the step one
            process would take on the union of the shards; all must call this together,
            with identical parameters. :data:`~natgrad.distributed.LOCAL`: one process.

    Returns:
        A :class:`PolicyStepResult`.
    """
    if legacy:
        settings, reducer = settings_from_keywords(PolicyStepSettings, legacy, reducer)
    if settings is None:
        raise TypeError("policy_step needs settings (a PolicyStepSettings)")
    out = None
    if settings.cuda_graph and not reducer.active:
        out = graphed_policy_step(actor, batch, settings)
    if out is None:
        out = policy_step_tensors(actor, batch, settings, generator=generator, reducer=reducer)
    with torch.no_grad():
        # Written unconditionally: a rejected search returns θ_old bit for bit, so the copy
        # is then a no-op, and deciding on the host would cost a device sync.
        new_params = out.space.unravel(out.theta)
        for name, p in actor.named_parameters():
            p.copy_(new_params[name])
    return _step_result(out)


def policy_step_tensors(
    actor: Actor,
    batch: PolicyBatch,
    settings: PolicyStepSettings,
    *,
    generator: torch.Generator | None = None,
    reducer: Reducer = LOCAL,
) -> PolicyStepTensors:
    """:func:`policy_step`'s computation, without touching the actor or the host.

    Arguments as :func:`policy_step`. With fixed-iteration CG (``cg_rtol = 0``),
    ``fvp_fraction = 1``, one process and the batched line search (CUDA), it runs without a
    host sync, which is what lets :func:`graphed_policy_step` record it as one CUDA graph.
    """
    params = {name: p.detach() for name, p in actor.named_parameters()}
    space = ParamSpace(params)
    theta_old = space.ravel(params)
    weight = reducer.weight(batch.obs.shape[0])

    # (0) π_θ linearised at θ_old on the Fisher's states, once: its outputs are π_old, its
    # reverse pass gives g in (2), its forward and reverse passes the Fisher in (3).
    fisher_obs, fisher_masks = _fisher_states(batch, settings.fvp_fraction, generator)
    fisher = _fisher(actor, params, fisher_obs, fisher_masks)
    linearised = fisher if _reuses_linearisation(fisher, fisher_obs, batch) else None
    old = _old_policy(actor, params, batch, linearised)

    # (1) L(θ_old) and (2) g = ∇_θ L(θ_old), as global means (with the entropy).
    surrogate_old, g = _surrogate_and_gradient(actor, params, batch, old, linearised)
    g, surrogate_old, policy_entropy = _global_means(reducer, weight, g, surrogate_old, old)

    # (3) H: every Fisher-vector product the mean over the Fisher states of every process.
    fisher_weight = weight if fisher_obs is batch.obs else reducer.weight(fisher_obs.shape[0])
    H = reducer.operator(fisher, fisher_weight)

    # (4) Natural step Δθ = sqrt(2δ / sᵀ(H+λI)s) · s, s ≈ (H+λI)⁻¹ g.
    step = natural_step(
        g,
        H,
        settings.max_kl,
        damping=settings.cg_damping,
        # check_finite=False: a non-finite g or product becomes a NON_FINITE zero step on the
        # device, where raising would need a host sync.
        solver=CG(rtol=settings.cg_rtol, maxiter=settings.cg_iters, check_finite=False),
    )

    # (5) Backtracking line search on the exact surrogate and the exact mean KL.
    result = _line_search(
        actor, space, theta_old, batch, old, step, surrogate_old, settings, reducer, weight
    )

    stats = _stats(result, surrogate_old, step, g, theta_old, policy_entropy)
    return PolicyStepTensors(theta=result.theta, stats=stats, step=step, space=space)


# --------------------------------------------------------------- the step's helpers
def _fisher_states(
    batch: PolicyBatch, fraction: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    """The states of the Fisher and their masks: the batch's, or a random ``fraction``."""
    obs, masks = batch.obs, batch.masks
    if fraction >= 1.0:
        return obs, masks
    n = obs.shape[0]
    idx = torch.randperm(n, generator=generator, device="cpu")[: max(1, int(round(fraction * n)))]
    idx = idx.to(obs.device)
    # A recurrent batch has L mask rows per sequence (trpo.recurrent): take whole sequences.
    return obs[idx], None if masks is None else masks.unflatten(0, (n, -1))[idx].flatten(0, 1)


def _dist(actor: Actor, params: dict[str, Tensor], obs: Tensor, masks: Tensor | None) -> Any:
    """π_θ's distribution parameters on ``obs``; invalid actions' logits −∞ under ``masks``."""
    dist = actor.functional_dist_params(params, obs)
    return dist if masks is None else mask_logits(dist, masks, check=False)


def _fisher(
    actor: Actor, params: dict[str, Tensor], obs: Tensor, masks: Tensor | None = None
) -> Any:
    """The Fisher operator at θ_old: on the written-out tanh-MLP products of
    :mod:`natgrad.mlp` for the plain actor without masks, else on ``torch.func``'s (with
    masks: the Fisher of the categorical restricted to the valid actions)."""
    if masks is not None:
        return fisher_operator(
            lambda p, o, m: _dist(actor, p, o, m), params, obs, masks, family=actor.family
        )
    written_out = actor.written_out_dist_fn(params, obs)
    if written_out is not None:
        return fisher_operator(
            written_out, params, obs, family=actor.family, linearization="custom"
        )
    return fisher_operator(actor.functional_dist_params, params, obs, family=actor.family)


def _reuses_linearisation(fisher: Any, fisher_obs: Tensor, batch: PolicyBatch) -> bool:
    """Whether the Fisher was built on the whole batch and exposes its outputs and ``Jᵀ``
    (any operator works for the step; only this one saves the extra forward passes)."""
    return (
        fisher_obs is batch.obs
        and getattr(fisher, "vjp", None) is not None
        and getattr(fisher, "outputs", None) is not None
    )


def _old_policy(
    actor: Actor, params: dict[str, Tensor], batch: PolicyBatch, fisher: Any | None
) -> OldPolicy:
    """π_old on the batch, from the Fisher's cached outputs when given (else a forward).

    Cloned: a shared log σ among the outputs is the live parameter itself, which the step
    overwrites; π_old must not move with it.
    """
    with torch.no_grad():
        dist = (
            fisher.outputs
            if fisher is not None
            else _dist(actor, params, batch.obs, batch.masks)
        )
        dist = torch.utils._pytree.tree_map(lambda t: t.detach().clone(), dist)
        family = actor.family
        return OldPolicy(
            family=family,
            dist=dist,
            log_prob=log_prob(family, dist, batch.actions),
            entropy=entropy(family, dist).mean(),
        )


def _surrogate_and_gradient(
    actor: Actor,
    params: dict[str, Tensor],
    batch: PolicyBatch,
    old: OldPolicy,
    fisher: Any | None,
) -> tuple[Tensor, Tensor]:
    """``(L(θ_old), g)``. With the Fisher's linearisation: g = Jᵀ ∇_z L, z = π_θ's
    distribution parameters (∇_z L is elementwise and cheap, Jᵀ the cached reverse pass);
    else by a forward and backward through the actor."""
    if fisher is not None:
        # torch.autograd, not torch.func.grad: the latter imports torch._dynamo (1-2 s).
        leaves, spec = tree_flatten(old.dist)
        leaves = [leaf.detach().requires_grad_() for leaf in leaves]
        with torch.enable_grad():
            value = surrogate(tree_unflatten(leaves, spec), batch, old)
            grads = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
        return value.detach(), fisher.vjp(tree_unflatten(list(grads), spec))
    return flat_grad(
        lambda p: surrogate(_dist(actor, p, batch.obs, batch.masks), batch, old), params
    )


def _global_means(
    reducer: Reducer, weight: float, g: Tensor, surrogate_old: Tensor, old: OldPolicy
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, L(θ_old), mean entropy)`` averaged over every process's batch: one reduction."""
    packed = torch.cat([g, surrogate_old.reshape(1), old.entropy.reshape(1).to(g)])
    packed = reducer.mean(packed, weight)
    return packed[:-2], packed[-2], packed[-1]


def line_search_batched(device: torch.device) -> bool:
    """Whether :func:`policy_step` evaluates its line-search candidates in one batched pass.

    On a GPU (``cuda``): one vmapped forward for all candidates and an on-device choice, no
    host sync per candidate. On a CPU the sequential search is cheaper, since the first
    candidate is usually accepted and later ones are then never evaluated.
    """
    return torch.device(device).type == "cuda"


def _line_search(
    actor: Actor,
    space: ParamSpace,
    theta_old: Tensor,
    batch: PolicyBatch,
    old: OldPolicy,
    step: NaturalStep,
    surrogate_old: Tensor,
    settings: PolicyStepSettings,
    reducer: Reducer,
    weight: float,
) -> LineSearchResult:
    """(5) The backtracking search from θ_old along Δθ on L(θ) and D̄_KL(θ).

    Both come from one forward per candidate: the search asks for L(θ) then D̄_KL(θ) at the
    same θ, so the pair is computed (and reduced over processes, one all-reduce) on the first
    call and reused by the second. On a GPU all candidates go in one vmapped pass.
    """
    batched = line_search_batched(batch.obs.device)
    cache: dict[str, Any] = {}

    def evaluate(theta: Tensor) -> tuple[Tensor, Tensor]:
        dist = _dist(actor, space.unravel(theta), batch.obs, batch.masks)
        return surrogate(dist, batch, old), mean_kl(dist, old)

    def pair(theta: Tensor) -> Tensor:
        if cache.get("theta") is not theta:
            value = torch.func.vmap(evaluate)(theta) if batched else evaluate(theta)
            cache["theta"], cache["pair"] = theta, reducer.mean(torch.stack(value), weight)
        return cache["pair"]

    with torch.no_grad():
        return line_search(
            lambda theta: pair(theta)[0],
            lambda theta: pair(theta)[1],
            theta_old,
            step.step,
            delta=settings.max_kl,
            expected_improvement=step.expected_improvement,
            shrink=settings.line_search_shrink,
            max_tries=settings.line_search_max_tries,
            accept_ratio=settings.line_search_accept_ratio,
            objective_old=surrogate_old,
            batched=batched,
        )


def _stats(
    result: LineSearchResult,
    surrogate_old: Tensor,
    step: NaturalStep,
    g: Tensor,
    theta_old: Tensor,
    policy_entropy: Tensor,
) -> Tensor:
    """Every number of the result in one float64 tensor: one device-to-host transfer."""
    stats = [
        result.accepted,
        torch.isfinite(surrogate_old),
        result.constraint,
        result.improvement,
        step.expected_improvement,
        result.step_fraction,
        result.tries,
        step.cg.iterations,
        step.cg.residual_norm,
        torch.linalg.vector_norm(g),
        torch.linalg.vector_norm(result.theta - theta_old),
        policy_entropy,
    ]
    return torch.stack([x.detach().reshape(()).to(torch.float64) for x in stats])


def _step_result(out: PolicyStepTensors) -> PolicyStepResult:
    (
        accepted,
        surrogate_finite,
        kl,
        improvement,
        expected,
        fraction,
        tries,
        cg_iterations,
        cg_residual,
        g_norm,
        step_norm,
        policy_entropy,
    ) = out.stats.tolist()
    accepted = bool(accepted)
    # A non-finite L(θ_old) makes the step meaningless even if g happened to be finite
    # (the line search then rejects every candidate, so nothing was applied). Reading the
    # status after the transfer above costs no further wait: the device is idle by now.
    status = out.step.status.name if surrogate_finite else "NON_FINITE"
    return PolicyStepResult(
        applied=accepted,
        status=status,
        kl=kl if accepted else 0.0,
        surrogate_improvement=improvement if accepted else 0.0,
        expected_improvement=expected,
        step_fraction=fraction if accepted else 0.0,
        line_search_tries=int(tries),
        cg_iterations=int(cg_iterations),
        cg_residual=cg_residual / g_norm if g_norm > 0 else 0.0,
        grad_norm=g_norm,
        step_norm=step_norm if accepted else 0.0,
        entropy=policy_entropy,
    )


# ------------------------------------------------------------------------ CUDA graph
def _batch_tensors(batch: PolicyBatch) -> tuple[Tensor, ...]:
    masks = () if batch.masks is None else (batch.masks,)
    return batch.obs, batch.actions, batch.advantages, *masks


def graphed_policy_step(
    actor: Actor, batch: PolicyBatch, settings: PolicyStepSettings
) -> PolicyStepTensors | None:
    """:func:`policy_step_tensors` of ``batch`` by replaying a recording
    (:mod:`natgrad.cuda_graph`), made at the first call for these shapes and settings.

    The batch is copied into the recording's static batch; the actor's parameters are read
    in place, so the recording stays valid as long as the actor keeps its parameter tensors.
    Returns ``None`` (the caller runs the step eagerly) off CUDA, when the settings need
    host syncs (``cg_rtol > 0``, ``fvp_fraction < 1``) or when recording failed.
    """
    device = batch.obs.device
    if not cuda_graph.recordable(device) or settings.cg_rtol != 0.0 or settings.fvp_fraction < 1:
        return None
    key = (
        "policy",
        settings,
        cuda_graph.parameter_signature(actor),
        *((tuple(t.shape), t.dtype, str(t.device)) for t in _batch_tensors(batch)),
    )

    def make() -> tuple[PolicyBatch, cuda_graph.Recording]:
        static = PolicyBatch(*(t.clone() for t in _batch_tensors(batch)))
        return static, cuda_graph.record(
            lambda: policy_step_tensors(actor, static, settings), device
        )

    entry = cuda_graph.CACHE.get(actor, key, make)
    if entry is None:
        return None
    static, rec = entry
    for dst, src in zip(_batch_tensors(static), _batch_tensors(batch)):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    rec.replay()
    return rec.outputs
