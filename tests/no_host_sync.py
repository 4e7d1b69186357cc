"""``NoHostSync``: a dispatch mode that fails on every op copying a device value to the host.

Used by the tests that promise "no host synchronisation" (fixed-iteration CG, the natural
step, the batched line search): ``with NoHostSync(): ...`` raises ``RuntimeError`` on
``.item()``, ``bool(tensor)`` and friends, on any device (CPU included).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostSync(TorchDispatchMode):
    """Fails on every op that copies a device value to the host."""

    BANNED = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise RuntimeError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))
