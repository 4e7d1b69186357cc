"""One status mechanism for every natgrad result (CG, Steihaug, natural step, line search, ...).

A solver reports *why* it stopped with a member of a :class:`Status` enum. Each member
carries its value (a stable string), an actionable message (what happened and what to try)
and whether it counts as success. Members are declared from the mildest to the most severe,
so a batch of per-column outcomes is summarised by the most severe one (the largest code),
and the codes can live in a device tensor: building a result never synchronises with the
host; reading :attr:`ResultStatus.status` does.

Results are frozen dataclasses that mix in :class:`ResultStatus` and hold a ``status_code``
tensor; they get ``status``, ``statuses``, ``success``, ``message`` and
``raise_if_failed()`` from it, raising a :class:`SolverError` (or the subclass named by the
result's ``error_type``) whose ``.result`` is the result. This follows lineax's
``Solution``/``RESULTS`` (an enum of actionable messages; the caller throws or inspects).

Example:
    >>> import torch
    >>> class Demo(Status):
    ...     DONE = "done", "finished", True
    ...     STUCK = "stuck", "no progress: raise maxiter", False
    >>> Demo.STUCK.message, Demo.DONE.success, Demo.code(Demo.STUCK)
    ('no progress: raise maxiter', True, 1)
    >>> Demo.worst(torch.tensor([0, 1, 0]))
    <Demo.STUCK: 'stuck'>
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["ResultStatus", "SolverError", "Status"]

_R = TypeVar("_R", bound="ResultStatus")


class Status(str, enum.Enum):
    """Base of natgrad's status enums: ``NAME = value, message, success``.

    Declaration order is severity order (mildest first); :meth:`code` is the index in it.
    """

    message: str
    success: bool

    def __new__(cls, value: str, message: str = "", success: bool = False) -> Status:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.message = message
        obj.success = success
        return obj

    @classmethod
    def code(cls, member: Status | str) -> int:
        """The integer code of ``member`` (its index in declaration order)."""
        return list(cls).index(cls(member))

    @classmethod
    def from_code(cls, code: int) -> Status:
        """The member whose :meth:`code` is ``code``."""
        return list(cls)[int(code)]

    @classmethod
    def worst(cls, codes: Tensor) -> Status:
        """The most severe status among ``codes`` (the first member for an empty tensor)."""
        flat = codes.reshape(-1)
        return cls.from_code(int(flat.max())) if flat.numel() else list(cls)[0]


class SolverError(RuntimeError):
    """Raised by :meth:`ResultStatus.raise_if_failed`; ``.result`` holds the result."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class ResultStatus:
    """Mixin for frozen result dataclasses with a ``status_code`` tensor field.

    Subclasses set ``status_type`` (their :class:`Status` enum) and may set ``error_type``
    (a :class:`SolverError` subclass) and override :attr:`message` with details.
    """

    status_type: ClassVar[type[Status]]
    error_type: ClassVar[type[SolverError]] = SolverError
    status_code: Tensor

    @property
    def status(self) -> Any:
        """The status; for a batch, the most severe column's (reading it syncs)."""
        return self.status_type.worst(self.status_code)

    @property
    def statuses(self) -> tuple[Any, ...]:
        """Per-column statuses (length 1 for a single problem)."""
        return tuple(self.status_type.from_code(c) for c in self.status_code.reshape(-1).tolist())

    @property
    def success(self) -> bool:
        """Whether every column ended in a success status."""
        return all(s.success for s in self.statuses)

    @property
    def message(self) -> str:
        """What happened and what to try (the most severe column's message)."""
        return self.status.message

    def status_mask(self, *statuses: Status | str) -> Tensor:
        """Bool tensor (per column) of where the status is one of ``statuses``; no sync."""
        mask = torch.zeros_like(self.status_code, dtype=torch.bool)
        for s in statuses:
            mask = mask | (self.status_code == self.status_type.code(s))
        return mask

    def raise_if_failed(self: _R, *, allow: tuple[Status | str, ...] = ()) -> _R:
        """Raise ``error_type`` unless every column succeeded or has a status in ``allow``.

        Returns:
            ``self``, so that ``x = solve(...).raise_if_failed().x`` reads in one line.
        """
        allowed = {self.status_type(s) for s in allow}
        if any(not (s.success or s in allowed) for s in self.statuses):
            raise self.error_type(self.message, self)
        return self
