"""CUDA graphs for the TRPO update: record a step once, replay it every update.

A small policy on a GPU is launch-bound: one gradient of a 17-64-64-6 policy at 25k states
costs a few milliseconds whatever the size, because each of its ~100 kernels is a separate
launch from Python. A policy step is ~2,000 such kernels (surrogate gradient, Fisher set-up,
15-25 CG iterations of a Fisher-vector product and CG's own vector ops, the batched line
search) and the critic fit ~25 per Adam step, 160+ steps. Recorded in a CUDA graph, each of
them is one launch, and the GPU runs the kernels back to back.

What makes recording possible is that both computations are already free of host syncs:
fixed-iteration CG (``natgrad.cg``: ``rtol = atol = 0``, flags with ``torch.where``), the
batched line search (all candidates in one vmapped pass, chosen on the device), Adam's fused
kernel (step count on the device). A graph replays with fixed memory, so every update copies
its new data into **static buffers** (observations, actions, advantages, returns, the
shuffling indices) and the outputs are read from the tensors the recording produced.

* :func:`graphed_policy_step` (``policy_step(cuda_graph=True)``): the whole of
  :func:`trpo.update.policy_step_tensors`; the actor's parameters are read in place, so the
  graph stays valid as long as the actor keeps its parameter tensors.
* :func:`replay_critic_fit` (``fit_critic(cuda_graph=True)``): all ``epochs × minibatches``
  Adam steps of :mod:`trpo.fast_critic` as one graph.

Recordings are cached per module (weakly) and per shapes/settings; a failure to record
(an op that syncs, an unsupported torch) is reported once with a warning and the caller falls
back to eager execution.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["graphed_policy_step", "replay_critic_fit", "Recording"]


@dataclass
class Recording:
    """A recorded computation: ``replay()`` re-runs it on the current contents of its static
    inputs and leaves the results in ``outputs`` (the tensors the recording produced)."""

    replay: Callable[[], None]
    outputs: Any


def _record_cuda_graph(
    fn: Callable[[], Any], device: torch.device, leaves: Callable[[Any], list[Tensor]]
) -> Recording:
    """Record ``fn()`` in a CUDA graph after two warm-up runs on a side stream (lazy
    initialisations such as cuBLAS workspaces must not happen during capture)."""
    del leaves  # a real graph writes every output in place
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return Recording(replay=graph.replay, outputs=outputs)


def emulate_recording(
    fn: Callable[[], Any], device: torch.device, leaves: Callable[[Any], list[Tensor]]
) -> Recording:
    """A stand-in for :func:`_record_cuda_graph` with the same contract, for testing the
    static-buffer plumbing on any device: ``replay()`` re-runs ``fn`` and copies the results
    into the first run's output tensors (``leaves`` lists the ones a caller reads)."""
    outputs = fn()

    def replay() -> None:
        for dst, src in zip(leaves(outputs), leaves(fn())):
            dst.copy_(src)

    return Recording(replay=replay, outputs=outputs)


#: How recordings are made (``emulate_recording`` in tests without a GPU).
record = _record_cuda_graph

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Any]] = weakref.WeakKeyDictionary()
_FAILED: set[tuple] = set()
_MAX_PER_MODULE = 2  # e.g. the full batch and a shorter last batch


def _cached(module: nn.Module, key: tuple, make: Callable[[], Any]) -> Any | None:
    entries = _CACHE.setdefault(module, {})
    if key in entries:
        return entries[key]
    if key in _FAILED:
        return None
    try:
        entry = make()
    except Exception as e:  # noqa: BLE001 - any failure: fall back to eager, say why once
        _FAILED.add(key)
        warnings.warn(
            f"CUDA graph recording failed ({type(e).__name__}: {e}); running eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if len(entries) >= _MAX_PER_MODULE:
        entries.pop(next(iter(entries)))
    entries[key] = entry
    return entry


def _recordable(device: torch.device) -> bool:
    # CUDA graphs need a CUDA device; the emulation (tests) runs anywhere.
    return device.type == "cuda" or record is not _record_cuda_graph


def _signature(module: nn.Module) -> tuple:
    # The recording reads the parameters in place: new tensors need a new recording.
    return tuple((tuple(p.shape), p.dtype, p.data_ptr()) for p in module.parameters())


# ----------------------------------------------------------------------------- policy
def graphed_policy_step(actor: nn.Module, batch: Any, settings: dict[str, Any]) -> Any | None:
    """:func:`trpo.update.policy_step_tensors` of ``batch`` by replaying a recording.

    Returns ``None`` (the caller runs the step eagerly) off CUDA, when the settings need
    host syncs (``cg_rtol > 0``, ``fvp_fraction < 1``) or when recording failed.
    """
    from trpo.update import PolicyBatch, policy_step_tensors

    device = batch.obs.device
    if not _recordable(device):
        return None
    if settings.get("cg_rtol", 0.0) != 0.0 or settings.get("fvp_fraction", 1.0) != 1.0:
        return None
    key = (
        "policy",
        tuple(sorted(settings.items())),
        _signature(actor),
        *((tuple(t.shape), t.dtype, str(t.device)) for t in batch_tensors(batch)),
    )

    def make() -> tuple[Any, Recording]:
        static = PolicyBatch(*(t.clone() for t in batch_tensors(batch)))
        rec = record(
            lambda: policy_step_tensors(actor, static, **settings),
            device,
            lambda out: [out.theta, out.stats, out.step.status_code],
        )
        return static, rec

    entry = _cached(actor, key, make)
    if entry is None:
        return None
    static, rec = entry
    for dst, src in zip(batch_tensors(static), batch_tensors(batch)):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    rec.replay()
    return rec.outputs


def batch_tensors(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The tensors of a :class:`trpo.update.PolicyBatch`, in field order."""
    return batch.obs, batch.actions, batch.advantages


# ----------------------------------------------------------------------------- critic
def replay_critic_fit(
    critic: nn.Module, state: Any, x_all: Tensor, returns: Tensor, idx_all: Tensor, mb: int
) -> Tensor | None:
    """``trpo.fast_critic._minibatch_loop`` of ``state`` by replaying a recording.

    ``state`` (a ``trpo.fast_critic._FlatMLP``) is updated as the eager loop would update
    it. Returns the last epoch's sum of squared errors, or ``None`` (caller runs eagerly)
    off CUDA, without the fused Adam kernel or when recording failed.
    """
    from trpo.fast_critic import _FlatMLP, _minibatch_loop

    if not _recordable(x_all.device) or not state.fused:
        return None
    key = (
        "critic",
        tuple(x_all.shape),
        tuple(idx_all.shape),
        mb,
        x_all.dtype,
        str(x_all.device),
        tuple(sorted(state.options.items())),
        tuple(state._shapes),
    )

    def make() -> tuple[Any, Tensor, Tensor, Tensor, Recording]:
        buffers = _FlatMLP(critic, state.optimizer)  # its own flat buffers: the static ones
        x, r, idx = x_all.clone(), returns.clone(), idx_all.clone()
        rec = record(
            lambda: _minibatch_loop(buffers, x, r, idx, mb),
            x_all.device,
            lambda total: [total, buffers.flat, buffers.exp_avg, buffers.exp_avg_sq],
        )
        return buffers, x, r, idx, rec

    entry = _cached(critic, key, make)
    if entry is None:
        return None
    buffers, x, r, idx, rec = entry
    with torch.no_grad():
        for dst, src in (
            (buffers.flat, state.flat),
            (buffers.exp_avg, state.exp_avg),
            (buffers.exp_avg_sq, state.exp_avg_sq),
            (x, x_all),
            (r, returns),
            (idx, idx_all),
        ):
            dst.copy_(src)
        buffers.step_t.fill_(float(state.step))
        rec.replay()
        state.flat.copy_(buffers.flat)
        state.exp_avg.copy_(buffers.exp_avg)
        state.exp_avg_sq.copy_(buffers.exp_avg_sq)
    state.step += idx_all.shape[0] * -(-x_all.shape[0] // mb)
    state.step_t.fill_(float(state.step))
    return rec.outputs.clone()
