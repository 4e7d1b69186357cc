"""Flat-vector view of parameter dicts.

Curvature operators, CG and the trust-region step work on flat 1-D tensors of
length ``n`` (the total number of parameters): CG's dot products and axpys are
then single fused kernels, and scipy interop is free. Models, on the other
hand, are evaluated with :func:`torch.func.functional_call` on a dict
``name -> tensor``. :class:`ParamSpace` converts between the two:

* ``ravel``: dict -> flat ``(n,)`` (one ``torch.cat``, i.e. one copy);
* ``unravel``: flat ``(n,)`` or ``(n, k)`` -> dict of **views** into the flat
  tensor (no copies, so writing into a view writes into the flat vector).

Example:
    >>> import torch
    >>> space = ParamSpace({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    >>> space.numel
    9
    >>> flat = torch.arange(9.0)
    >>> space.unravel(flat)["b"]
    tensor([6., 7., 8.])
    >>> torch.equal(space.ravel(space.unravel(flat)), flat)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParamSpace", "detached_params", "flat_grad"]


class ParamSpace:
    """The layout of a parameter dict as one flat vector.

    The order of the flat vector is the insertion order of the mapping the
    space was built from (for ``dict(model.named_parameters())`` that is the
    module's registration order). Only shapes, dtype and device are kept, never
    the values, so a space built from ``θ_old`` also serves any other ``θ``.

    Attributes:
        names: Parameter names, in flat order.
        shapes: Their shapes.
        numel: ``n``, the total number of elements.
        dtype: The common dtype of all parameters.
        device: The common device of all parameters.
        offsets: Start of each parameter in the flat vector (``len(names) + 1``
            entries, the last one is ``n``).
    """

    __slots__ = ("names", "shapes", "numel", "dtype", "device", "offsets", "_sizes")

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numel: int
    dtype: torch.dtype
    device: torch.device
    offsets: tuple[int, ...]

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        """Build the layout of ``params``.

        Args:
            params: Mapping name -> tensor; all tensors must share one floating
                dtype and one device. At least one tensor.

        Raises:
            ValueError: ``params`` is empty, holds a non-tensor, or mixes
                dtypes or devices.
        """
        if isinstance(params, Tensor):
            raise ValueError(
                "params must be a mapping name -> tensor, got a bare tensor: pass {'x': x}, "
                "or dict(module.named_parameters()) for a module"
            )
        if not isinstance(params, Mapping) or len(params) == 0:
            raise ValueError("params must be a non-empty mapping name -> tensor")
        names, shapes, sizes = [], [], []
        dtype = device = None
        for name, p in params.items():
            if not isinstance(p, Tensor):
                raise ValueError(f"params[{name!r}] must be a torch.Tensor, got {type(p).__name__}")
            if dtype is None:
                dtype, device = p.dtype, p.device
            elif p.dtype != dtype or p.device != device:
                raise ValueError(
                    f"params must share one dtype and device: params[{name!r}] is "
                    f"{p.dtype} on {p.device}, the first one is {dtype} on {device}"
                )
            names.append(name)
            shapes.append(p.shape)
            sizes.append(p.numel())
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        setattr_ = object.__setattr__
        setattr_(self, "names", tuple(names))
        setattr_(self, "shapes", tuple(shapes))
        setattr_(self, "_sizes", tuple(sizes))
        setattr_(self, "offsets", tuple(offsets))
        setattr_(self, "numel", offsets[-1])
        setattr_(self, "dtype", dtype)
        setattr_(self, "device", device)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ParamSpace is immutable (tried to set {name!r})")

    def __repr__(self) -> str:
        return f"ParamSpace(numel={self.numel}, names={list(self.names)}, dtype={self.dtype})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParamSpace):
            return NotImplemented
        return (self.names, self.shapes, self.dtype, self.device) == (
            other.names,
            other.shapes,
            other.dtype,
            other.device,
        )

    def __hash__(self) -> int:
        return hash((self.names, self.shapes, self.dtype, self.device))

    def ravel(self, params: Mapping[str, Tensor]) -> Tensor:
        """Concatenate a parameter dict into one flat vector.

        Args:
            params: Mapping with exactly the names of this space, each tensor of
                the recorded shape, dtype and device.

        Returns:
            A new ``(n,)`` tensor (one ``torch.cat``), in the order of ``names``.

        Raises:
            ValueError: Keys, shapes, dtype or device of ``params`` differ from
                the space.
        """
        if len(params) != len(self.names):
            self._check_keys(params)
        try:
            parts = [params[name] for name in self.names]
        except KeyError:
            self._check_keys(params)
            raise  # unreachable: _check_keys raises
        for name, shape, p in zip(self.names, self.shapes, parts):
            if p.shape != shape or p.dtype != self.dtype or p.device != self.device:
                raise ValueError(
                    f"params[{name!r}] is {tuple(p.shape)} {p.dtype} on {p.device}, "
                    f"expected {tuple(shape)} {self.dtype} on {self.device}"
                )
        return torch.cat([p.reshape(-1) for p in parts])

    def unravel(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or a block of k flat vectors) into views.

        Args:
            flat: ``(n,)`` or ``(n, k)`` tensor of this space's dtype and device.

        Returns:
            Dict name -> view of ``flat`` with shape ``shape`` (for ``(n,)``) or
            ``(*shape, k)`` (for ``(n, k)``). No data is copied: an in-place write
            into a view changes ``flat``.

        Raises:
            ValueError: ``flat`` has the wrong number of rows, ndim, dtype or
                device.
        """
        if (
            not isinstance(flat, Tensor)
            or flat.ndim not in (1, 2)
            or flat.shape[0] != self.numel
            or flat.dtype != self.dtype
            or flat.device != self.device
        ):
            got = (
                f"{tuple(flat.shape)} {flat.dtype} on {flat.device}"
                if isinstance(flat, Tensor)
                else type(flat).__name__
            )
            raise ValueError(
                f"flat must be a ({self.numel},) or ({self.numel}, k) tensor of "
                f"{self.dtype} on {self.device}, got {got}"
            )
        # Splitting dimension 0 of a strided tensor is always expressible as a
        # view, so `view` never copies (and never fails) here.
        tail = flat.shape[1:]
        return {
            name: flat[o : o + s].view((*shape, *tail))
            for name, shape, o, s in zip(self.names, self.shapes, self.offsets, self._sizes)
        }

    def zeros(self) -> Tensor:
        """A ``(n,)`` zero vector of this space's dtype and device."""
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def _check_keys(self, params: Mapping[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in set(self.names)]
        raise ValueError(
            f"params keys differ from the space: missing {missing}, unexpected {extra}"
        )


def detached_params(params: Mapping[str, Tensor]) -> tuple[ParamSpace, dict[str, Tensor]]:
    """``(ParamSpace(params), {name: tensor.detach()})``: the point a curvature is taken at.

    Detached (views of the same storage, no copy) so that nothing natgrad builds
    touches the caller's autograd graph or ``.grad``.

    Raises:
        ValueError: ``params`` is not a valid parameter mapping (see :class:`ParamSpace`).
    """
    return ParamSpace(params), {k: v.detach() for k, v in params.items()}


def flat_grad(
    fn: Callable[..., Tensor], params: Mapping[str, Tensor], *args: Any
) -> tuple[Tensor, Tensor]:
    """Value and flat gradient of a scalar function of a parameter dict.

    ``g = ∇_θ fn(θ, *args)`` by one reverse pass (:func:`torch.autograd.grad` on detached
    copies of the leaves, so the caller's graph and ``.grad`` are untouched; not
    ``torch.func``, whose first call in a process imports ``torch._dynamo``, ≈ 1.5 s),
    ravelled in the order of ``ParamSpace(params)``. A parameter ``fn`` does not use gets a
    zero gradient.

    Args:
        fn: ``fn(params_dict, *args) -> scalar tensor`` (typically built on
            :func:`torch.func.functional_call`).
        params: Mapping name -> tensor at which to differentiate.
        *args: Further arguments of ``fn`` (not differentiated).

    Returns:
        ``(value, g)``: the 0-dim value and the ``(n,)`` gradient.

    Raises:
        ValueError: ``params`` is not a valid parameter mapping, or ``fn`` does
            not return a scalar.
    """
    space = ParamSpace(params)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        out = fn(leaves, *args)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError("fn must return a scalar tensor")
        out = out.reshape(())
        if out.requires_grad:
            grads = torch.autograd.grad(out, list(leaves.values()), allow_unused=True)
        else:
            grads = (None,) * len(leaves)
    flat = space.ravel(
        {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    )
    return out.detach(), flat
