"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM: finish the update, save, then stop.

:class:`StopOnSignal` is a context manager. While it is active, the first SIGINT or SIGTERM
only records the signal (:attr:`StopOnSignal.signum`) and prints one line; the training
loop polls :attr:`StopOnSignal.requested` between updates, saves the last completed update
and stops. A second signal restores the previous handlers and raises
:class:`ImmediateInterrupt` (a ``KeyboardInterrupt``) at once, wherever the program is: the
user asked twice. On exit the previous handlers are restored, so nothing leaks out of
``train``. Handlers can be installed only from the main thread; elsewhere the context
manager does nothing (signals then keep their previous behaviour).

Subprocess envs (``async_envs``) are started under :func:`children_ignore_sigint`: a
Ctrl-C in a terminal goes to the whole process group, and workers that died of it would
leave the main process unable to finish the update or close the envs. Ignored, it reaches
the main process alone, which stops the run and then closes the workers.

Exit codes follow the shell's convention, ``128 + signal number``: 130 for SIGINT, 143
for SIGTERM (:func:`exit_code`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "ImmediateInterrupt",
    "StopOnSignal",
    "children_ignore_sigint",
    "exit_code",
    "signal_name",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``'SIGINT'`` for 2, ``'SIGTERM'`` for 15, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: ``128 + signum``."""
    return 128 + int(signum)


@contextlib.contextmanager
def children_ignore_sigint(enabled: bool = True) -> Iterator[None]:
    """Ignore SIGINT while the block runs, so that processes started in it ignore it too
    (an ignored signal stays ignored across ``fork`` and ``exec``, and Python then installs
    no ``KeyboardInterrupt`` handler); the previous handler is restored after. A Ctrl-C
    during the block is lost. No effect when ``enabled`` is False or off the main thread.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class ImmediateInterrupt(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the run stopped at once, without saving.

    Attributes:
        signum: The signal that arrived second.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal_name(signum)} received twice: stopped at once without saving")
        self.signum = signum


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request polled by the caller (see module doc).

    Attributes:
        signum: The first signal received, or None.
    """

    def __init__(self, announce: str = "finishing the current update, then saving") -> None:
        self.signum: int | None = None
        self._announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a first signal arrived."""
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            # None: the handler was not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._restore()
            raise ImmediateInterrupt(signum)
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "send it"
        print(
            f"{signal_name(signum)} received: {self._announce} ({again} again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
