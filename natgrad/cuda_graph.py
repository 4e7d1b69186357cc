"""Record a sync-free computation once as a CUDA graph, replay it on new data.

A small model on a GPU is launch-bound: each of the hundreds of kernels of a natural-gradient
step (a gradient, 15-25 CG iterations of a Fisher-vector product, a batched line search) or
of a loop of minibatch Adam steps is a separate launch from Python. Recorded in a CUDA graph,
the whole computation is one launch and the GPU runs its kernels back to back.

Recording needs a computation that never reads the device from the host (no ``.item()``,
no ``bool(tensor)``, no data-dependent shapes): fixed-iteration CG (``natgrad.cg`` with
``rtol = atol = 0``), the batched line search, a fused Adam kernel with its step count on
the device. :class:`NoHostSync` checks that on any device (tests use it on CPU). A graph
replays on fixed memory, so callers copy new data into **static** input tensors and read the
results from the tensors the recording produced (:class:`Recording`).

* :func:`record_cuda_graph`: the recording itself (two warm-up runs on a side stream, then
  the capture);
* :func:`emulate_recording`: the same contract on any device (replay = run again and copy
  the results into the first run's tensors), to test a caller's static-buffer plumbing
  without a GPU; :data:`recorder` selects which one :func:`record` uses;
* :class:`GraphCache` (:data:`CACHE`): recordings kept per owner (weakly, e.g. per module)
  and per key (shapes, settings); a recording that fails is reported once with a warning
  and the caller runs eagerly.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CACHE",
    "GraphCache",
    "NoHostSync",
    "Recording",
    "emulate_recording",
    "parameter_signature",
    "record",
    "record_cuda_graph",
    "recordable",
]


@dataclasses.dataclass(frozen=True)
class Recording:
    """A recorded computation: ``replay()`` re-runs it on the current contents of its static
    inputs and leaves the results in ``outputs`` (the objects the recording returned)."""

    replay: Callable[[], None]
    outputs: Any


def record_cuda_graph(fn: Callable[[], Any], device: torch.device) -> Recording:
    """Record ``fn()`` in a CUDA graph after two warm-up runs on a side stream (lazy
    initialisations such as cuBLAS workspaces must not happen during the capture)."""
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


def _tensors(obj: Any) -> list[Tensor]:
    """Every tensor inside ``obj`` (dataclass fields, tuples, lists, dict values), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def emulate_recording(fn: Callable[[], Any], device: torch.device) -> Recording:
    """:func:`record_cuda_graph`'s contract on any device, for tests: ``replay()`` runs
    ``fn`` again and copies every tensor of its result into the first run's tensors (what a
    real replay does to the recorded outputs)."""
    del device  # the emulation runs where the data is
    outputs = fn()

    def replay() -> None:
        with torch.no_grad():
            for dst, src in zip(_tensors(outputs), _tensors(fn())):
                dst.copy_(src)

    return Recording(replay=replay, outputs=outputs)


#: How :func:`record` records: :func:`record_cuda_graph`, or :func:`emulate_recording` in tests.
recorder: Callable[[Callable[[], Any], torch.device], Recording] = record_cuda_graph


def record(fn: Callable[[], Any], device: torch.device) -> Recording:
    """Record ``fn`` with the current :data:`recorder`."""
    return recorder(fn, device)


def recordable(device: torch.device | str) -> bool:
    """Whether :func:`record` can record on ``device``: CUDA, or anywhere when emulated."""
    return torch.device(device).type == "cuda" or recorder is not record_cuda_graph


def parameter_signature(module: nn.Module) -> tuple:
    """Shapes, dtypes and addresses of ``module``'s parameters: a recording that reads them
    in place is valid only for these very tensors (part of a cache key)."""
    return tuple((tuple(p.shape), p.dtype, p.data_ptr()) for p in module.parameters())


class GraphCache:
    """Recordings per owner (held weakly) and key; at most ``per_owner`` per owner (oldest
    dropped first), e.g. one for the full batch and one for a shorter last batch."""

    def __init__(self, per_owner: int = 2) -> None:
        self.per_owner = per_owner
        self.clear()

    def clear(self) -> None:
        """Forget every recording and every failure."""
        self._entries: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._failed: set[tuple] = set()

    def get(self, owner: Any, key: tuple, make: Callable[[], Any]) -> Any | None:
        """The entry for ``(owner, key)``, made by ``make()`` on first use; ``None`` if
        making it failed (now or before: the warning is given once per key)."""
        entries = self._entries.setdefault(owner, {})
        if key in entries:
            return entries[key]
        if key in self._failed:
            return None
        try:
            entry = make()
        except Exception as e:  # noqa: BLE001 - any failure: fall back to eager, say why once
            self._failed.add(key)
            warnings.warn(
                f"CUDA graph recording failed ({type(e).__name__}: {e}); running eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        if len(entries) >= self.per_owner:
            entries.pop(next(iter(entries)))
        entries[key] = entry
        return entry


#: The process-wide cache of recordings.
CACHE = GraphCache()


class NoHostSync(TorchDispatchMode):
    """A context in which every op that copies a device value to the host raises
    ``RuntimeError("host sync: …")`` (``.item()``, ``bool(t)``, ``float(t)``), on any device:
    a computation that runs inside it can be recorded as a CUDA graph."""

    BANNED = frozenset(
        {
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.is_nonzero.default,
            torch.ops.aten.item.default,
        }
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in self.BANNED:
            raise RuntimeError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))
