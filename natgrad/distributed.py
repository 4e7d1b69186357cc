"""Data parallelism on :mod:`torch.distributed`: all-reduce wrappers for the natural step.

Each rank (process) holds its own shard of the data, ``n_r`` samples of a global batch of
``N = Σ_r n_r``. Every quantity of a natural-gradient / trust-region step that is a *mean
over samples* — the loss and its gradient ``g``, every curvature-vector product ``H v``, the
line-search objective and constraint — is a global mean, assembled from the local means
``m_r`` with the sample-count weights ``w_r = n_r / N``:

    mean over the global batch = Σ_r w_r · m_r          (one SUM all-reduce of w_r · m_r)

so a step with the data split over ranks equals the single-process step on the whole batch
(up to float rounding), also when the shards have different sizes. The CG iterates, the step
and the line-search decisions then agree on every rank because their inputs do; the
parameters never need to be re-broadcast (:func:`check_agreement` verifies it cheaply).

Every helper is a no-op (returns its input, or ``1.0`` for :func:`sample_weight`) when
:mod:`torch.distributed` is not initialised or has one rank, so the same code runs in one
process. A collective must be entered by every rank, in the same order: call the helpers
unconditionally (never inside a branch on rank-local data).

Tensors on the CPU need the gloo backend, CUDA tensors nccl; :func:`init_from_env`
initialises ``"cpu:gloo,cuda:nccl"`` for CUDA runs so both kinds can be reduced.

A :class:`Reducer` bundles these reductions as one injected value: code that takes a
``reducer`` (:data:`LOCAL`, the identity, by default) needs no branch on whether it runs
distributed. Example (every rank runs this; ``fisher`` and ``g`` are rank-local means)::

    reducer = Reducer()                       # LOCAL in a single-process run
    w = reducer.weight(batch_size_on_this_rank)
    g = reducer.mean(g, w)
    fisher = reducer.operator(fisher, w)
    step = natural_step(g, fisher, max_kl, damping=0.1)   # identical on every rank
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from natgrad.linop import LinearOperator

__all__ = [
    "LOCAL",
    "DivergenceError",
    "Reducer",
    "all_gather_rows",
    "all_reduce_mean",
    "all_reduce_operator",
    "all_reduce_sum",
    "average_gradients",
    "broadcast_object",
    "broadcast_tensors",
    "check_agreement",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "merge_moments",
    "sample_weight",
]

Group = Any  # torch.distributed.ProcessGroup | None (None = the default group)


class DivergenceError(RuntimeError):
    """Tensors that must be identical on every rank (the parameters) differ between ranks."""


# ----------------------------------------------------------------------------- topology
def is_distributed(group: Group = None) -> bool:
    """True iff :mod:`torch.distributed` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_world_size(group: Group = None) -> int:
    """Number of ranks, 1 when not initialised."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def get_rank(group: Group = None) -> int:
    """This process's rank, 0 when not initialised."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def init_from_env(
    device: torch.device | str = "cpu", *, timeout: float | datetime.timedelta = 300.0
) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Does something only when ``WORLD_SIZE > 1`` is set (by ``torchrun``, or by hand together
    with ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) and no group exists yet. The backend
    is ``"gloo"`` for a CPU device and ``"cpu:gloo,cuda:nccl"`` for CUDA (CUDA tensors go
    through nccl, CPU tensors such as sample counts and normaliser statistics through gloo).

    ``timeout`` bounds every collective: a rank that waits longer for its peers (one of them
    hangs) raises instead of blocking forever. A rank that *dies* is noticed at once: its
    sockets close and the peers' next collective raises.

    Args:
        device: The device the tensors of the run live on.
        timeout: Seconds (or a ``timedelta``), > 0.

    Returns:
        True if this call created the process group (the caller should then
        :func:`torch.distributed.destroy_process_group` it), False otherwise.

    Raises:
        ValueError: ``WORLD_SIZE`` is not an int, or ``timeout`` is not > 0.
        RuntimeError: :mod:`torch.distributed` is unavailable in this build, or the
            rendezvous fails.
    """
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world_size = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int, got {raw!r}") from None
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not isinstance(timeout, datetime.timedelta):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        timeout = datetime.timedelta(seconds=float(timeout))
    backend = "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return True


# -------------------------------------------------------------------------- reductions
def sample_weight(
    n_local: int, *, group: Group = None, device: torch.device | str = "cpu"
) -> float:
    """``w_r = n_r / Σ_s n_s``, this rank's share of the global batch (1.0 in one process).

    One all-reduce of a float64 scalar on ``device`` (CPU by default; pass the CUDA device
    for a pure-nccl group).

    Raises:
        ValueError: ``n_local`` is negative, or the global batch is empty.
    """
    if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
        raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
    if not is_distributed(group):
        if n_local == 0:
            raise ValueError("n_local must be > 0 in a single process (empty batch)")
        return 1.0
    total = torch.tensor(float(n_local), dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    if float(total) == 0.0:
        raise ValueError("the global batch is empty (n_local = 0 on every rank)")
    return n_local / float(total)


def all_reduce_sum(x: Tensor, *, group: Group = None) -> Tensor:
    """``Σ_r x_r`` on every rank (out of place; ``x`` itself when not distributed)."""
    if not is_distributed(group):
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean(x: Tensor, *, weight: float | None = None, group: Group = None) -> Tensor:
    """The weighted average ``Σ_r w_r x_r`` on every rank (``x`` itself when not distributed).

    Args:
        x: A floating tensor of the same shape on every rank: a rank-local mean.
        weight: ``w_r``, this rank's :func:`sample_weight` (the weights sum to 1 over the
            ranks); None gives the plain average ``w_r = 1 / world_size``.
        group: The process group (default: the world).

    Returns:
        A new tensor (out of place), or ``x`` itself when not distributed.

    Raises:
        ValueError: ``x`` is not a floating-point tensor.
    """
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if not is_distributed(group):
        return x
    w = 1.0 / dist.get_world_size(group) if weight is None else float(weight)
    out = x.detach() * w  # a new tensor: the all-reduce below is in place
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_operator(
    op: LinearOperator, *, weight: float | None = None, group: Group = None
) -> LinearOperator:
    """``v -> Σ_r w_r (A_r v)``: a :class:`LinearOperator` whose every product is averaged.

    ``A_r`` is the rank-local operator (e.g. the Fisher on this rank's states, a mean over
    them); with ``w_r = n_r / N`` the result is the operator of the global batch. ``v``
    must be the same on every rank (CG's iterates are, when ``b`` and the products are).
    Blocks ``(n, k)`` are reduced in one all-reduce. Returns ``op`` itself when not
    distributed.

    Raises:
        ValueError: ``op`` is not a :class:`LinearOperator`.
    """
    if not isinstance(op, LinearOperator):
        raise ValueError(f"op must be a natgrad LinearOperator, got {type(op).__name__}")
    if not is_distributed(group):
        return op

    def matvec(v: Tensor) -> Tensor:
        return all_reduce_mean(op.matvec(v), weight=weight, group=group)

    return LinearOperator(matvec, op.shape, op.dtype, op.device, matmat=matvec)


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in order (one collective each)."""
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    return buckets


def _tensors(params: nn.Module | Iterable[Tensor], *, buffers: bool) -> list[Tensor]:
    if isinstance(params, nn.Module):
        out = list(params.parameters())
        if buffers:
            out += [b for b in params.buffers() if b.is_floating_point()]
        return out
    out = list(params)
    if not all(isinstance(t, Tensor) for t in out):
        raise ValueError("params must be an nn.Module or an iterable of tensors")
    return out


def average_gradients(
    params: nn.Module | Iterable[Tensor], *, weight: float | None = None, group: Group = None
) -> None:
    """Replace every ``p.grad`` by ``Σ_r w_r p.grad_r`` (before the optimiser step).

    With ``w_r = n_r / N`` and gradients of rank-local *mean* losses this is the gradient of
    the global mean loss. ``weight=1.0`` sums instead (for losses already divided by the
    global count). One all-reduce per (dtype, device) of all gradients flattened together.
    Parameters whose ``grad`` is None are skipped; that pattern must be the same on every
    rank (it is, for the same model and loss). No-op when not distributed.
    """
    tensors = [p for p in _tensors(params, buffers=False) if p.grad is not None]
    if not is_distributed(group) or not tensors:
        return
    w = 1.0 / dist.get_world_size(group) if weight is None else float(weight)
    grads = [p.grad for p in tensors]
    for idx in _buckets(grads).values():
        flat = torch.cat([grads[i].reshape(-1) for i in idx]) * w
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            n = grads[i].numel()
            grads[i].copy_(flat[offset : offset + n].view_as(grads[i]))
            offset += n


def broadcast_tensors(
    params: nn.Module | Iterable[Tensor], *, src: int = 0, group: Group = None
) -> None:
    """Overwrite, in place, the tensors of every rank with those of rank ``src``.

    For an ``nn.Module``: its parameters and floating-point buffers. One broadcast per
    (dtype, device). Call at start so that every rank begins from rank ``src``'s parameters.
    No-op when not distributed.
    """
    tensors = _tensors(params, buffers=True)
    if not is_distributed(group) or not tensors:
        return
    with torch.no_grad():
        for idx in _buckets(tensors).values():
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset : offset + n].view_as(tensors[i]))
                offset += n


def broadcast_object(obj: Any, *, src: int = 0, group: Group = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` when not distributed)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_rows(x: Tensor, *, group: Group = None) -> Tensor:
    """Concatenate ``(n_r, ...)`` tensors of every rank along dim 0, in rank order.

    The ``n_r`` may differ between ranks (e.g. the episodes that ended on each); the trailing
    shape, dtype and device must not. Two collectives (the sizes, then the padded rows).
    Returns ``x`` itself when not distributed.

    Raises:
        ValueError: ``x`` is a 0-d tensor.
    """
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise ValueError("x must be a tensor with a leading dimension (n, ...)")
    if not is_distributed(group):
        return x
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def merge_moments(
    mean: Tensor, var: Tensor, count: float | int | Tensor, *, group: Group = None
) -> tuple[Tensor, Tensor, float]:
    """Population moments of the union of every rank's batch (Chan et al.'s merge, exact).

    With ``(μ_r, σ²_r, n_r)`` the rank-local mean, population variance and count::

        N = Σ n_r,   μ = Σ n_r μ_r / N,   σ² = Σ n_r (σ²_r + (μ_r − μ)²) / N

    (never an average of the variances: the spread of the means counts too). Two
    all-reduces; compute in float64. A rank with ``n_r = 0`` contributes nothing (its
    ``μ_r``, ``σ²_r`` are ignored, even if NaN).

    Returns:
        ``(μ, σ², N)``; ``(mean, var, count)`` unchanged when not distributed; zeros and
        ``N = 0`` when every rank is empty.

    Raises:
        ValueError: ``mean`` and ``var`` differ in shape, or ``count`` < 0.
    """
    if mean.shape != var.shape:
        raise ValueError(
            f"mean and var must have one shape, got {tuple(mean.shape)}, {tuple(var.shape)}"
        )
    n = float(count)
    if not n >= 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    if not is_distributed(group):
        return mean, var, n
    if n == 0:
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    packed = torch.cat([mean.reshape(-1) * n, mean.new_full((1,), n)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total = float(packed[-1])
    if total == 0:
        return torch.zeros_like(mean), torch.zeros_like(var), 0.0
    global_mean = (packed[:-1] / total).view_as(mean)
    m2 = (var + (mean - global_mean) ** 2) * n
    dist.all_reduce(m2, op=dist.ReduceOp.SUM, group=group)
    return global_mean, m2 / total, total


# ---------------------------------------------------------------------------- reducer
@dataclass(frozen=True)
class Reducer:
    """Turns per-process sample means into global ones: the reduction a data-parallel
    computation is given, instead of branching on whether it runs distributed.

    With ``w_r = n_r / N`` (:meth:`weight`), the global mean of a per-sample quantity is
    ``Σ_r w_r m_r`` (:meth:`mean`); :meth:`operator` does that to every product of a
    :class:`LinearOperator` (a Fisher on each process's states), :meth:`sum` and
    :meth:`sum_gradients` add over processes. :data:`LOCAL` (``enabled=False``) is the
    identity, and so is every method when :mod:`torch.distributed` is not initialised or has
    one rank: code written against a reducer runs unchanged in one process. Every process
    must make the same calls in the same order (each is a collective when active).

    Attributes:
        enabled: False: the identity everywhere (no collective, even when initialised).
        group: The process group (None: the default group).
    """

    enabled: bool = True
    group: Group = None

    @property
    def active(self) -> bool:
        """True iff the methods communicate (enabled, and more than one rank)."""
        return self.enabled and is_distributed(self.group)

    def weight(self, n_local: int) -> float:
        """``w_r = n_r / Σ_s n_s`` (1.0 when not active); one all-reduce. See :func:`sample_weight`."""
        return sample_weight(n_local, group=self.group) if self.enabled else 1.0

    def mean(self, x: Tensor, weight: float) -> Tensor:
        """``Σ_r w_r x_r`` with ``weight`` = this process's :meth:`weight` (``x`` when not active)."""
        return all_reduce_mean(x, weight=weight, group=self.group) if self.active else x

    def sum(self, x: Tensor) -> Tensor:
        """``Σ_r x_r`` (``x`` itself when not active)."""
        return all_reduce_sum(x, group=self.group) if self.active else x

    def sum_(self, x: Tensor) -> None:
        """``x ← Σ_r x_r`` in place (one all-reduce); nothing when not active."""
        if self.active:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)

    def operator(self, op: Any, weight: float) -> Any:
        """``v -> Σ_r w_r (A_r v)`` (``op`` itself when not active). See :func:`all_reduce_operator`."""
        return all_reduce_operator(op, weight=weight, group=self.group) if self.active else op

    def sum_gradients(self, params: nn.Module | Iterable[Tensor]) -> None:
        """Replace every ``p.grad`` by ``Σ_r p.grad_r`` (for losses already divided by a
        global count); nothing when not active."""
        if self.active:
            average_gradients(params, weight=1.0, group=self.group)

    def all(self, flag: bool) -> bool:
        """True on every process iff ``flag`` is True on every process (one all-reduce)."""
        if not self.active:
            return bool(flag)
        ok = all_reduce_sum(
            torch.tensor([float(bool(flag))], dtype=torch.float64), group=self.group
        )
        return int(ok[0]) == get_world_size(self.group)


LOCAL = Reducer(enabled=False)
"""The identity :class:`Reducer`: one process, every method returns its input."""


# ------------------------------------------------------------------------ agreement
_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _checksum(tensors: Sequence[Tensor]) -> Tensor:
    """Two int64 checksums of the *bits* of all tensors: ``[Σ b_i, Σ (2i+1) b_i]`` (mod 2⁶⁴)
    with ``b_i`` each element's bit pattern as an integer. A change of any single element
    (even of one ulp) or a swap of two elements changes them, unlike a float sum."""
    s = torch.zeros(2, dtype=torch.int64)
    for t in tensors:
        x = t.detach().reshape(-1)
        bits = x.view(_SAME_SIZE_INT[x.element_size()]).to(torch.int64)
        odd = torch.arange(1, 2 * bits.numel(), 2, dtype=torch.int64, device=bits.device)
        s = s + torch.stack([bits.sum(), (bits * odd).sum()]).cpu()
    return s


def check_agreement(
    tensors: nn.Module | Iterable[Tensor],
    *,
    what: str = "parameters",
    group: Group = None,
    device: torch.device | str = "cpu",
) -> None:
    """Raise on every rank if ``tensors`` differ between ranks (a cheap checksum compare).

    Each rank reduces the bits of its tensors to two int64 checksums; one all-gather of the
    ``2·world_size`` numbers and a comparison with rank 0's follow, so every rank
    reaches the same verdict and all raise together (no rank is left waiting). Data-parallel
    updates keep the parameters bit-identical, hence the exact comparison. No-op when not
    distributed.

    Args:
        tensors: A module (parameters and floating buffers) or tensors; the same number, in
            the same order, on every rank.
        what: Named in the error message.
        group: The process group.
        device: Where the checksums are gathered (CPU for gloo; the CUDA device for a
            pure-nccl group).

    Raises:
        DivergenceError: naming the ranks whose checksum differs from rank 0's.
    """
    items = _tensors(tensors, buffers=True)
    if not is_distributed(group):
        return
    mine = _checksum(items).to(device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    bad = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
    if bad:
        raise DivergenceError(
            f"{what} differ between ranks: the checksums of rank(s) {bad} differ from rank "
            f"0's ({[p.tolist() for p in parts]}); the ranks no longer run the same model "
            "(a rank-local decision, a non-deterministic reduction, or a missed collective)"
        )
