"""Crash-safe, tamper-evident, unpickling-safe checkpoints (issue 6).

Layout inside a run directory::

    RUN_DIR/checkpoints/ckpt_000123.pt          torch.save of a plain state dict (update 123)
    RUN_DIR/checkpoints/ckpt_000123.pt.sha256   JSON record {"sha256": ..., "size": ..., ...}

Guarantees:

- **Atomic**: the bytes go to a temporary file in the same directory, which is flushed and
  fsynced, then renamed over the target with ``os.replace`` and the directory is fsynced. The
  record is written the same way *before* the checkpoint, so a kill at any instant leaves
  either the previous checkpoint as the newest valid one or the new one complete with its
  record; never a half-written file under a checkpoint name.
- **Verified**: :func:`load_checkpoint` checks size and SHA-256 against the record and raises
  :class:`CheckpointError` naming the file on any mismatch (truncation, flipped bytes).
  :func:`load_latest_checkpoint` falls back to the previous valid checkpoint.
- **Never through a link, never a special file** (issue 13): a symbolic link named
  ``checkpoints/`` is refused (:class:`CheckpointError`) before anything is listed, written or
  deleted; pruning unlinks names relative to the opened directory, so it never deletes
  outside it. Files are opened with ``O_NOFOLLOW | O_NONBLOCK`` and read only if ``fstat``
  says they are regular files no larger than their record: a FIFO, ``/dev/zero`` or a link
  named like a checkpoint is passed over as invalid, never read until it blocks or fills
  memory. A failed write (disk full, ``ulimit -f``, read-only directory) raises
  :class:`CheckpointError` naming the path and what to do, and leaves neither a temporary
  file nor the new record behind.
- **Compatible**: :func:`load_latest_checkpoint` takes a ``validate`` hook (e.g.
  :func:`check_state_shapes`) so that a newer checkpoint of another env or network size is
  passed over, with its reason, like a corrupted one.
- **No arbitrary code**: loading uses ``torch.load(weights_only=True)`` only, so a crafted
  pickle is refused. States must therefore be plain data (tensors, dicts, lists, tuples,
  numbers, strings, None); :func:`save_checkpoint` checks this before writing.
  :func:`capture_rng_state` / :func:`restore_rng_state` convert RNG states to such data.

Example:
    >>> import tempfile, torch
    >>> run_dir = tempfile.mkdtemp()
    >>> p = save_run_checkpoint(run_dir, 7, {"update": 7, "w": torch.ones(2)})
    >>> p.name
    'ckpt_000007.pt'
    >>> load_latest_checkpoint(run_dir).state["update"]
    7
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trpo.fileio import (
    TMP_PREFIX,
    FileTooLargeError,
    RunDirError,
    atomic_write_bytes,
    describe_os_error,
    read_regular_file,
    refuse_symlink,
)

__all__ = [
    "CHECKPOINT_DIRNAME",
    "CheckpointError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "check_state_shapes",
    "checkpoint_dir",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "save_run_checkpoint",
    "verify_checkpoint",
]

CHECKPOINT_DIRNAME = "checkpoints"
"""Sub-directory of a run directory that holds its checkpoints."""

_RECORD_SUFFIX = ".sha256"
_TMP_PREFIX = TMP_PREFIX
_MAX_RECORD_BYTES = 1 << 16
_NAME_RE = re.compile(r"^ckpt_(\d+)\.pt$")
_FORMAT_VERSION = 1
# Types torch.load(weights_only=True) reconstructs without custom globals.
_PLAIN_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_PLAIN_CONTAINERS = (list, tuple, set)
_PLAIN_DICTS = (dict, collections.OrderedDict)


class CheckpointError(RunDirError):
    """A checkpoint is missing, corrupted, truncated, unverifiable, not plain data, not a
    regular file, incompatible (a ``validate`` hook refused it), or cannot be written."""


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """Result of :func:`load_latest_checkpoint`.

    Attributes:
        path: the checkpoint that was loaded.
        update: its update index (from the file name).
        state: the loaded state dict.
        skipped: ``(path, reason)`` of every newer checkpoint that failed verification or
            loading and was passed over, newest first (log these: they are lost updates).
    """

    path: Path
    update: int
    state: dict[str, Any]
    skipped: tuple[tuple[Path, str], ...] = ()


# --- paths ----------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | os.PathLike[str], update: int) -> Path:
    """``run_dir/checkpoints/ckpt_{update:06d}.pt`` (more digits past 999999)."""
    if isinstance(update, bool) or not isinstance(update, int) or update < 0:
        raise ValueError(f"update must be an int ≥ 0 (got {update!r})")
    return Path(run_dir) / CHECKPOINT_DIRNAME / f"ckpt_{update:06d}.pt"


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + _RECORD_SUFFIX)


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoints``, refused if it is a symbolic link.

    Raises:
        CheckpointError: if it is a link: pruning through it would delete files elsewhere.
    """
    directory = Path(run_dir) / CHECKPOINT_DIRNAME
    try:
        refuse_symlink(directory, "checkpoint directory")
    except RunDirError as e:
        raise CheckpointError(str(e)) from None
    return directory


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(update, path)`` of every entry named like a checkpoint, newest (highest update)
    first.

    Entries are not verified or followed (a link or FIFO so named is listed, and refused when
    loaded); temporary files of interrupted writes are never listed.

    Raises:
        CheckpointError: if ``run_dir/checkpoints`` is a symbolic link.
    """
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    with os.scandir(directory) as entries:
        found = [(int(m.group(1)), Path(e.path)) for e in entries if (m := _NAME_RE.match(e.name))]
    return sorted(found, key=lambda t: t[0], reverse=True)


# --- plain-data check -------------------------------------------------------------------------
def _check_plain(obj: Any, where: str) -> None:
    """Raise ValueError naming the first value ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise ValueError(f"{where}: tensor subclass {type(obj).__name__} is not plain data")
        return
    if isinstance(obj, torch.Size) or type(obj) in _PLAIN_SCALARS:
        return
    if type(obj) in _PLAIN_DICTS:
        for k, v in obj.items():
            if type(k) not in (str, int, bool, float, tuple, type(None)):
                raise ValueError(f"{where}: key {k!r} of type {type(k).__name__} is not plain")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in _PLAIN_CONTAINERS:
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    hint = ""
    if isinstance(obj, np.ndarray):
        hint = " (convert with torch.from_numpy)"
    elif isinstance(obj, np.generic):
        hint = " (convert with .item())"
    raise ValueError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain data that "
        f"torch.load(weights_only=True) can read{hint}"
    )


# --- atomic write -----------------------------------------------------------------------------
def _write_failed(path: Path, e: RunDirError | OSError) -> CheckpointError:
    reason = str(e) if isinstance(e, RunDirError) else describe_os_error(path, e)
    return CheckpointError(f"checkpoint not saved: {reason}")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` with its size/SHA-256 record beside it.

    Order: serialise in memory → write the record atomically → write the checkpoint
    atomically. A kill before the last rename leaves the old file (if any) in place; if it
    had the same name, its record no longer matches and it is treated as corrupted, so
    loading falls back to the previous checkpoint, never to unverified bytes.

    Args:
        path: destination file; its directory is created if needed.
        state: plain data only (see module docstring); nested dicts, lists, tensors, ...

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: naming the key path of the first value that is not plain data.
        CheckpointError: if it cannot be written (disk full, ``ulimit -f``, not writable,
            the directory is a link); no temporary file or new record is left behind.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict (got {type(state).__name__})")
    _check_plain(state, "state")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    record = {
        "file": path.name,
        "format": _FORMAT_VERSION,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "torch": torch.__version__,
    }
    record_path = _record_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record_path, (json.dumps(record, indent=1) + "\n").encode())
    except (OSError, RunDirError) as e:
        raise _write_failed(path, e) from e
    try:
        atomic_write_bytes(path, data)
    except RunDirError as e:
        # The new record without its checkpoint would describe nothing (or, over an older
        # file of the same name, make it fail verification, which is what a kill does too).
        with contextlib.suppress(OSError):
            os.unlink(record_path)
        raise _write_failed(path, e) from e
    return path


# --- verified load ----------------------------------------------------------------------------
def _read(path: Path, max_bytes: int | None) -> bytes:
    """The bytes of a regular file (never a link, FIFO or device) of at most ``max_bytes``."""
    try:
        return read_regular_file(path, max_bytes=max_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except RunDirError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def _read_verified(path: Path, verify: bool) -> bytes:
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not verify:
        return _read(path, None)
    record_path = _record_path(path)
    try:
        record = json.loads(read_regular_file(record_path, max_bytes=_MAX_RECORD_BYTES))
        expected_size, expected_sha = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no checksum record {record_path.name}; it may be from an "
            "interrupted write (pass verify=False to load it unchecked)"
        ) from None
    except (RunDirError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checksum record {record_path} is unreadable: {e}") from None
    # The size is checked (fstat) before any byte is read: a file larger than its record
    # is refused without reading it.
    try:
        data = read_regular_file(path, max_bytes=expected_size)
    except FileTooLargeError:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: larger than the {expected_size} bytes its "
            "record says"
        ) from None
    except RunDirError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    if len(data) != expected_size:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted: {len(data)} bytes, "
            f"its record says {expected_size}"
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha != expected_sha:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: SHA-256 {sha[:16]}… does not match its record "
            f"{expected_sha[:16]}…"
        )
    return data


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check ``path`` against its size/SHA-256 record without unpickling anything.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    _read_verified(Path(path), verify=True)


def _unpickler_reason(e: BaseException) -> str:
    """The informative line of a torch.load error (torch wraps it in generic advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in lines:
        if "WeightsUnpickler error:" in ln or "unsupported" in ln.lower():
            reason = ln.split("WeightsUnpickler error:")[-1].strip().split(". Please use")[0]
            if reason:
                return reason.rstrip(".")
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation", "(")
    specific = [ln for ln in lines if not ln.startswith(generic)]
    return (specific or lines or [type(e).__name__])[0].rstrip(".")


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The file is read once; its size and SHA-256 are checked against the record (``verify``),
    then the same bytes are deserialised with ``torch.load(weights_only=True)``, which
    refuses any pickled object other than plain data; nothing in the file is executed.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (default: everything on CPU).
        verify: check the size/SHA-256 record (False: for a file copied without it).

    Returns:
        The state dict.

    Raises:
        CheckpointError: naming the file, if it is missing, fails verification, is not a
            torch file, contains non-plain objects (e.g. a crafted pickle), or is not a dict.
    """
    path = Path(path)
    data = _read_verified(path, verify)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError (refused global/opcode), RuntimeError (bad zip), ...
        raise CheckpointError(
            f"checkpoint {path} was refused by torch.load(weights_only=True): "
            f"{_unpickler_reason(e)}. It is not plain tensor data: it is corrupted, or crafted "
            "to run code when unpickled; never load it with weights_only=False unless you "
            "trust its source"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint`, or None.

    Corrupted, truncated or unrecorded newer files are passed over (use
    :func:`load_latest_checkpoint` to also learn which and why).
    """
    for _, path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def check_state_shapes(state: Mapping[str, Any], **modules: torch.nn.Module) -> None:
    """Raise unless ``state[name]`` is a state dict with exactly the keys and tensor shapes
    of ``modules[name].state_dict()`` for every name (a :func:`load_latest_checkpoint`
    ``validate`` hook: ``validate=lambda s: check_state_shapes(s, actor=a, critic=c)``).

    Raises:
        CheckpointError: naming the first missing/unexpected key or differing shape (the
            checkpoint of another env or network size).
    """
    for name, module in modules.items():
        saved = state.get(name)
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"it holds no {name!r} state dict")
        expected = module.state_dict()
        if set(saved) != set(expected):
            diff = sorted(set(saved) ^ set(expected))[:3]
            raise CheckpointError(f"its {name} has other parameters ({', '.join(diff)} …)")
        for key, tensor in expected.items():
            got = saved[key]
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else None
            if shape != tuple(tensor.shape):
                raise CheckpointError(
                    f"its {name} parameter {key!r} has shape {shape}, this {name} needs "
                    f"{tuple(tensor.shape)} (a checkpoint of another env or network size?)"
                )


def load_latest_checkpoint(
    run_dir: str | os.PathLike[str],
    map_location: Any = "cpu",
    *,
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> LoadedCheckpoint:
    """Load the newest checkpoint of ``run_dir`` that verifies, loads and validates.

    Args:
        run_dir: the run directory.
        map_location: passed to ``torch.load``.
        validate: called with each loaded state; raising ``CheckpointError`` or
            ``ValueError`` (e.g. :func:`check_state_shapes`) passes the file over like a
            corrupted one, with the message as its reason in :attr:`LoadedCheckpoint.skipped`.

    Raises:
        CheckpointError: if there is none; the message lists every file tried and why it
            failed. Also if ``run_dir/checkpoints`` is a symbolic link.
    """
    skipped: list[tuple[Path, str]] = []
    for update, path in list_checkpoints(run_dir):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        try:
            if validate is not None:
                validate(state)
        except (CheckpointError, ValueError) as e:
            skipped.append((path, f"checkpoint {path} does not fit: {e}"))
            continue
        return LoadedCheckpoint(path=path, update=update, state=state, skipped=tuple(skipped))
    where = checkpoint_dir(run_dir)
    if not skipped:
        raise CheckpointError(f"no checkpoint found in {where}")
    reasons = "; ".join(reason for _, reason in skipped)
    raise CheckpointError(f"no valid checkpoint in {where}: {reasons}")


# --- rotation -----------------------------------------------------------------------------------
def prune_checkpoints(
    run_dir: str | os.PathLike[str], keep: int = 3, *, protect: Path | None = None
) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, their records, orphan records and
    leftover temporary files of interrupted writes.

    Args:
        run_dir: the run directory.
        keep: checkpoints to keep (≥ 1).
        protect: a checkpoint never deleted (the one just written).

    Returns:
        The deleted paths.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int (got {keep!r})")
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    doomed = [p.name for _, p in list_checkpoints(run_dir)[keep:] if p != protect]
    doomed += [_record_path(Path(name)).name for name in doomed]
    # Names are unlinked relative to the directory opened without following a link, so a
    # directory swapped for a link after the check above still cannot redirect a deletion;
    # unlink never follows a link either (it removes the link), and directories are kept.
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise CheckpointError(describe_os_error(directory, e, "open")) from e
    try:
        with os.scandir(dir_fd) as it:
            entries = {e.name: e.is_dir(follow_symlinks=False) for e in it}
        for name in entries:
            if name.startswith(_TMP_PREFIX):
                doomed.append(name)
            elif name.endswith(_RECORD_SUFFIX) and name[: -len(_RECORD_SUFFIX)] not in entries:
                doomed.append(name)  # orphan record
        deleted = []
        for name in dict.fromkeys(doomed):  # de-duplicate, keep order
            if entries.get(name, True):  # gone already, or a directory
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
                deleted.append(directory / name)
    finally:
        os.close(dir_fd)
    return deleted


def save_run_checkpoint(
    run_dir: str | os.PathLike[str], update: int, state: dict[str, Any], *, keep: int = 3
) -> Path:
    """Save ``state`` as the checkpoint of ``update`` in ``run_dir``, then keep the newest
    ``keep``. Returns the checkpoint path.

    Raises:
        CheckpointError: if ``run_dir/checkpoints`` is a symbolic link (nothing is written
            or deleted), or the write fails (see :func:`save_checkpoint`).
    """
    checkpoint_dir(run_dir)
    path = save_checkpoint(checkpoint_path(run_dir, update), state)
    prune_checkpoints(run_dir, keep, protect=path)
    return path


# --- RNG states as plain data -------------------------------------------------------------------
def _to_plain(x: Any) -> Any:
    """numpy bit-generator state → plain data (arrays become tagged lists)."""
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_plain(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__ndarray__", "dtype"}:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: _from_plain(v) for k, v in x.items()}
    return x


def capture_rng_state(
    *,
    torch_generator: torch.Generator | None = None,
    numpy_generator: np.random.Generator | None = None,
    global_torch: bool = True,
) -> dict[str, Any]:
    """Snapshot RNG states as plain data for a checkpoint.

    Args:
        torch_generator: an explicit ``torch.Generator`` (its ``get_state()`` tensor).
        numpy_generator: a ``numpy.random.Generator`` (its bit generator's state, arrays
            converted to lists).
        global_torch: also store torch's global CPU (and every CUDA device's) state, which
            layers such as dropout or ``torch.randn`` without a generator draw from.

    Returns:
        A dict with the keys present among ``torch``, ``cuda``, ``torch_generator``, ``numpy``.
    """
    state: dict[str, Any] = {}
    if global_torch:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
    if torch_generator is not None:
        state["torch_generator"] = torch_generator.get_state()
    if numpy_generator is not None:
        state["numpy"] = _to_plain(numpy_generator.bit_generator.state)
    return state


def restore_rng_state(
    state: dict[str, Any],
    *,
    torch_generator: torch.Generator | None = None,
    numpy_generator: np.random.Generator | None = None,
) -> None:
    """Inverse of :func:`capture_rng_state`: set every RNG whose state is present.

    Raises:
        ValueError: if a generator is passed but its state is missing, or the numpy bit
            generator kind differs from the saved one.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if torch_generator is not None:
        if "torch_generator" not in state:
            raise ValueError("torch_generator given but the state holds no 'torch_generator'")
        torch_generator.set_state(state["torch_generator"].cpu())
    if numpy_generator is not None:
        if "numpy" not in state:
            raise ValueError("numpy_generator given but the state holds no 'numpy' state")
        saved = _from_plain(state["numpy"])
        kind = type(numpy_generator.bit_generator).__name__
        if saved.get("bit_generator") != kind:
            raise ValueError(
                f"numpy_generator uses {kind} but the saved state is of "
                f"{saved.get('bit_generator')!r}"
            )
        numpy_generator.bit_generator.state = saved
