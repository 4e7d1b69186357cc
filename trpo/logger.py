"""Metrics of a run: a CSV (always), TensorBoard events (when installed), a learning curve
(SVG, or PNG through matplotlib), and a progress bar.

Metric keys are namespaced and stable (:data:`METRIC_KEYS` documents each one); every row of
``metrics.csv`` has a ``global_step`` column (environment steps so far) followed by one
column per key ever logged. Values are written with ``repr(float)``, so they read back
bit-identical, which the determinism test relies on (compare rows with
:func:`is_timing_key` columns dropped).

Example:
    >>> import tempfile
    >>> run_dir = tempfile.mkdtemp()
    >>> with MetricsLogger(run_dir, tensorboard=False) as logger:
    ...     logger.log(1024, {"trpo/kl": 0.004, "charts/episode_return": 21.5})
    ...     logger.log(2048, {"trpo/kl": 0.006, "eval/episode_return": 200.0})
    >>> cols = read_metrics(logger.csv_path)
    >>> cols["global_step"], cols["trpo/kl"]
    ([1024, 2048], [0.004, 0.006])
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, NamedTuple

from trpo.fileio import (
    RunDirError,
    atomic_write_bytes,
    atomic_writer,
    describe_os_error,
    open_append_regular,
    read_regular_file,
    refuse_symlink,
)
from trpo.svg_chart import Series, line_chart_svg

__all__ = [
    "CSV_FILENAME",
    "METRIC_KEYS",
    "MetricsFileError",
    "STEP_COLUMN",
    "TENSORBOARD_DIRNAME",
    "MetricsLogger",
    "ProgressBar",
    "is_timing_key",
    "plot_learning_curve",
    "read_metrics",
]

CSV_FILENAME = "metrics.csv"
"""Name of the metrics CSV inside a run directory."""
STEP_COLUMN = "global_step"
"""First CSV column: environment steps taken so far (summed over envs)."""
TENSORBOARD_DIRNAME = "tensorboard"
"""Sub-directory of the run directory holding TensorBoard event files."""

METRIC_KEYS: Mapping[str, str] = MappingProxyType(
    {
        # progress and returns (raw env rewards, before any reward normalisation)
        "charts/update": "Index of the update (1-based).",
        "charts/episode_return": "Mean undiscounted return of episodes finished in the rollout.",
        "charts/episode_length": "Mean length of the episodes finished in the rollout.",
        "charts/episodes": "Number of episodes finished in the rollout.",
        "charts/steps_per_second": "Env steps per wall-clock second of this rollout + update.",
        "eval/episode_return": "Mean return of deterministic evaluation episodes.",
        "eval/episode_length": "Mean length of deterministic evaluation episodes.",
        # policy step: natural gradient + line search
        "trpo/surrogate_improvement": "L(θ_new) − L(θ_old) of the step taken (0 if rejected).",
        "trpo/expected_improvement": "First-order prediction gᵀΔθ of the full natural step.",
        "trpo/improvement_ratio": "surrogate_improvement / (step_fraction · expected).",
        "trpo/kl": "Mean KL(π_old‖π_new) over the batch states after the step (≤ max_kl).",
        "trpo/step_fraction": "Accepted fraction shrinkᵏ of the full step (0 if rejected).",
        "trpo/line_search_success": "1 if the line search accepted a step, else 0.",
        "trpo/line_search_tries": "Candidates evaluated by the line search.",
        "trpo/grad_norm": "‖g‖, norm of the surrogate gradient.",
        "trpo/step_norm": "‖θ_new − θ_old‖ of the applied step.",
        "trpo/entropy": "Mean policy entropy over the batch states before the step.",
        "trpo/nonfinite_update": "1 if the update was rejected for a non-finite value, else 0.",
        "trpo/consecutive_failures": "Non-finite updates in a row (the run stops at the limit).",
        # natural-gradient solve
        "natgrad/cg_iterations": "CG iterations run for s ≈ (H + λI)⁻¹g.",
        "natgrad/cg_residual": "Relative final CG residual ‖g − (H + λI)s‖ / ‖g‖.",
        "natgrad/curvature": "sᵀ(H + λI)s, the quadratic KL model of the step direction.",
        # critic
        "trpo/value_loss": "Critic mean squared error over the last fitting epoch.",
        "trpo/explained_variance": "1 − Var[R − V(s)] / Var[R] before fitting the critic.",
        # timing (excluded from determinism comparisons)
        "time/rollout_seconds": "Wall-clock seconds of the rollout.",
        "time/update_seconds": "Wall-clock seconds of the policy + critic update.",
        "time/policy_step_seconds": "Wall-clock seconds of the trust-region policy step.",
        "time/critic_seconds": "Wall-clock seconds of the critic fit.",
        "time/elapsed_seconds": "Wall-clock seconds since the run (or the resume) started.",
    }
)
"""Stable metric key → meaning. Loggers accept other keys too; these are the documented ones."""

_TIMING_EXACT = frozenset({"charts/steps_per_second"})


def is_timing_key(key: str) -> bool:
    """True for wall-clock-dependent columns, which differ between otherwise identical runs."""
    return key.startswith("time/") or key in _TIMING_EXACT


def _to_number(key: str, value: Any) -> int | float | None:
    """Python int/float for a metric value (tensor, numpy or Python scalar); None = no value."""
    if value is None:
        return None
    if hasattr(value, "numel") and hasattr(value, "item"):  # torch.Tensor without importing
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar (got shape {tuple(value.shape)})")
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"metric {key!r} must be a real number (got {type(value).__name__})")


def _format(value: int | float | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else repr(value)


def _parse(cell: str) -> int | float:
    if cell == "":
        return math.nan
    try:
        return int(cell)
    except ValueError:
        return float(cell)


class MetricsFileError(RunDirError, ValueError):
    """``metrics.csv`` cannot be used: not a metrics CSV, a link, not a regular file, or not
    writable. (A ``ValueError`` too, for callers that caught the older error.)"""


class _CsvContent(NamedTuple):
    header: list[str]
    rows: list[list[str]]
    partial: bool  # a last line cut short (no newline) was dropped
    bad_lines: list[int]  # 1-based line numbers of dropped unreadable rows


def _valid_row(row: list[str], width: int) -> bool:
    """A row as :class:`MetricsLogger` writes it: ``width`` cells, an int step, numbers."""
    if len(row) != width:
        return False
    try:
        if int(row[0]) < 0:
            return False
        for cell in row[1:]:
            _parse(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> _CsvContent:
    """Read a metrics CSV (a regular file, never through a link). Rows that are not valid
    UTF-8 or not rows of numbers of the header's width are dropped and their line numbers
    reported, so that garbage bytes cost only the rows they hit."""
    try:
        data = read_regular_file(path)
    except RunDirError as e:
        raise MetricsFileError(str(e)) from None
    partial = bool(data) and not data.endswith(b"\n")
    if partial:
        data = data[: data.rfind(b"\n") + 1]
    lines = data.split(b"\n")[:-1] if data else []
    try:
        header = next(csv.reader([lines[0].decode()])) if lines else []
    except UnicodeDecodeError:
        header = []
    rows, bad = [], []
    for number, raw in enumerate(lines[1:], start=2):
        try:
            row = next(csv.reader([raw.decode()]), [])
        except (UnicodeDecodeError, csv.Error):
            row = None
        if row == []:
            continue
        if row is None or not _valid_row(row, len(header)):
            bad.append(number)
        else:
            rows.append(row)
    return _CsvContent(header, rows, partial, bad)


def _write_csv_atomic(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    try:
        with atomic_writer(path, "w") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    except RunDirError as e:
        raise MetricsFileError(str(e)) from None


def _keep_damaged_copy(path: Path) -> Path:
    """Save the bytes of a damaged CSV as ``<name>.damaged[-k]`` before it is repaired."""
    for k in range(1000):
        backup = path.with_name(f"{path.name}.damaged" + (f"-{k}" if k else ""))
        if not os.path.lexists(backup):
            break
    atomic_write_bytes(backup, read_regular_file(path))
    return backup


class MetricsLogger:
    """Append metric rows to ``run_dir/metrics.csv`` and, optionally, TensorBoard.

    CSV columns are ``global_step`` then every key in first-logged order. A row lacking a key
    leaves its cell empty. When a new key appears the file is rewritten once with the wider
    header (old rows get empty cells), so any CSV reader sees one consistent table. Each row
    is flushed to the OS as soon as it is logged, so a killed run keeps every logged row.

    Resuming: pass ``resume_step`` (the ``global_step`` of the checkpoint resumed from). Rows
    with a larger step, logged after that checkpoint and about to be produced again, are
    removed from the CSV, and TensorBoard purges its events after that step.

    Damage: an existing CSV whose rows hold garbage bytes or are mangled (wrong width,
    non-numbers) is **repaired by dropping those rows**, with a warning on stderr naming their
    line numbers; the original bytes are kept as ``metrics.csv.damaged`` first, so nothing is
    lost. A file whose header is not a metrics header is refused (:class:`MetricsFileError`).
    ``metrics.csv`` is never opened through a symbolic link, and every rewrite is atomic.

    Args:
        run_dir: directory of the run (created if needed).
        tensorboard: also write TensorBoard events to ``run_dir/tensorboard`` if
            ``torch.utils.tensorboard`` (the ``tensorboard`` package) can be imported;
            otherwise silently CSV only (see :attr:`tensorboard_enabled`).
        resume_step: drop rows after this step (see above); None = keep every existing row.
        flush_secs: TensorBoard flush interval in seconds.

    Raises:
        MetricsFileError: if the run directory or the CSV cannot be created or written (the
            message names the path and what to do), or the CSV is not a metrics CSV.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        flush_secs: int = 10,
    ) -> None:
        if resume_step is not None and (
            isinstance(resume_step, bool) or not isinstance(resume_step, int) or resume_step < 0
        ):
            raise ValueError(f"resume_step must be None or an int ≥ 0 (got {resume_step!r})")
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / CSV_FILENAME
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MetricsFileError(describe_os_error(self.run_dir, e, "create")) from e
        if tensorboard:  # its events would be written (and purged on resume) elsewhere
            try:
                refuse_symlink(self.run_dir / TENSORBOARD_DIRNAME, "TensorBoard directory")
            except RunDirError as e:
                raise MetricsFileError(str(e)) from None
        self._columns: list[str] = []
        fresh = not (os.path.lexists(self.csv_path) and os.lstat(self.csv_path).st_size > 0)
        if not fresh:
            self._columns = self._repair(resume_step)
        self._file: IO[str] | None = None
        self._reopen()
        if fresh:
            self._write_row([STEP_COLUMN])
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self._tb = SummaryWriter(
                    log_dir=str(self.run_dir / TENSORBOARD_DIRNAME),
                    purge_step=None if resume_step is None else resume_step + 1,
                    flush_secs=flush_secs,
                )

    def _repair(self, resume_step: int | None) -> list[str]:
        """Drop cut, damaged and purged rows of the existing CSV; return its metric columns."""
        header, rows, partial, bad = _read_csv(self.csv_path)
        if not header or header[0] != STEP_COLUMN:
            raise MetricsFileError(
                f"{self.csv_path} is not a metrics CSV (first column {header[:1]!r}, expected "
                f"{STEP_COLUMN!r}); move it away, or resume another run"
            )
        kept = rows
        if resume_step is not None:
            kept = [r for r in rows if _parse(r[0]) <= resume_step]
        if bad:
            backup = _keep_damaged_copy(self.csv_path)
            shown = ", ".join(map(str, bad[:10])) + (" …" if len(bad) > 10 else "")
            print(
                f"warning: {self.csv_path}: dropped {len(bad)} unreadable row(s) (line "
                f"{shown}); the original is kept as {backup.name}",
                file=sys.stderr,
            )
        if partial or bad or len(kept) != len(rows):  # cut by a kill, damaged or purged rows
            _write_csv_atomic(self.csv_path, header, kept)
        return header[1:]

    def _reopen(self) -> None:
        try:
            self._file = open_append_regular(self.csv_path)
        except RunDirError as e:
            raise MetricsFileError(str(e)) from None
        self._writer = csv.writer(self._file)

    def _write_row(self, row: Sequence[Any]) -> None:
        assert self._file is not None
        try:
            self._writer.writerow(row)
            self._file.flush()
        except OSError as e:
            raise MetricsFileError(describe_os_error(self.csv_path, e)) from e

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    @property
    def columns(self) -> list[str]:
        """Metric columns of the CSV so far (without ``global_step``)."""
        return list(self._columns)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` at ``step`` (environment steps so far).

        Args:
            step: the x-axis value, an int ≥ 0.
            metrics: key → scalar (Python/numpy number, bool, or one-element tensor;
                None = no value). NaN and inf are written as such.

        Raises:
            ValueError: on a non-scalar or non-numeric value, or a bad key or step.
        """
        if self._file is None:
            raise ValueError("log() called on a closed MetricsLogger")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int ≥ 0 (got {step!r})")
        values: dict[str, int | float] = {}
        for key, raw in metrics.items():
            if not isinstance(key, str) or not key or key == STEP_COLUMN:
                raise ValueError(
                    f"metric key must be a non-empty string other than "
                    f"{STEP_COLUMN!r} (got {key!r})"
                )
            v = _to_number(key, raw)
            if v is not None:
                values[key] = v
        new = [k for k in values if k not in self._columns]
        if new:
            self._widen(new)
        self._write_row([int(step)] + [_format(values.get(k)) for k in self._columns])
        if self._tb is not None:
            for key, v in values.items():
                self._tb.add_scalar(key, v, int(step))

    def _widen(self, new_keys: list[str]) -> None:
        """Rewrite the CSV with ``new_keys`` appended to the header."""
        if self._file is not None:
            self._file.close()
        rows = _read_csv(self.csv_path).rows
        self._columns.extend(new_keys)
        pad = [""] * len(new_keys)
        _write_csv_atomic(self.csv_path, [STEP_COLUMN, *self._columns], [r + pad for r in rows])
        self._reopen()

    def flush(self) -> None:
        """Push buffered CSV rows and TensorBoard events to disk."""
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                raise MetricsFileError(describe_os_error(self.csv_path, e)) from e
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; further :meth:`log` calls raise. Idempotent."""
        try:
            self.flush()
        finally:  # closed even when the flush failed (disk full), so the error is the flush's
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(csv_path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Columns of a metrics CSV: ``global_step`` as ints, every other column as floats with
    NaN where a row had no value (or logged NaN). Unreadable rows are skipped (see
    :class:`MetricsLogger`, which repairs the file and keeps the original)."""
    header, rows, _, _ = _read_csv(Path(csv_path))
    columns: dict[str, list[Any]] = {name: [] for name in header}
    for row in rows:
        row = row + [""] * (len(header) - len(row))
        for name, cell in zip(header, row):
            v = _parse(cell)
            columns[name].append(int(v) if name == STEP_COLUMN else float(v))
    return columns


def plot_learning_curve(
    csv_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    x: str = STEP_COLUMN,
    y: str = "charts/episode_return",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot ``y`` against ``x`` from one or several metrics CSVs (one line each).

    ``out_path`` ending in ``.svg`` is written by :func:`trpo.svg_chart.line_chart_svg`
    (standard library only: what every run saves); any other suffix (``.png``, ``.pdf``) by
    matplotlib's Agg canvas (no pyplot, no display, no global state). Rows where ``y`` is
    missing or non-finite are skipped; a run without any point is noted in the figure
    instead of failing, so a short run still gets its chart. Written atomically: a link at
    ``out_path`` is replaced, never followed.

    Returns:
        ``out_path`` as a ``Path``.
    """
    paths = [csv_paths] if isinstance(csv_paths, (str, os.PathLike)) else list(csv_paths)
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels has {len(labels)} entries for {len(paths)} CSV files")
    series: list[Series] = []
    for i, path in enumerate(paths):
        cols = read_metrics(path)
        pts = [
            (a, b)
            for a, b in zip(cols.get(x, []), cols.get(y, []))
            if math.isfinite(a) and math.isfinite(b)
        ]
        label = labels[i] if labels is not None else Path(path).parent.name or str(path)
        xs, ys = zip(*pts) if pts else ((), ())
        series.append((label, xs, ys))
    empty = [label for label, xs, _ in series if not xs]
    note = f"no finite {y} yet in: {', '.join(empty)}" if empty else None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix.lower() == ".svg":
        svg = line_chart_svg(series, title=title or y, xlabel=x, ylabel=y, note=note)
        atomic_write_bytes(out_path, svg.encode())
    else:
        _plot_matplotlib(series, out_path, x=x, y=y, title=title or y, note=note)
    return out_path


def _plot_matplotlib(series: list[Series], out_path: Path, *, x: str, y: str, title: str,
                     note: str | None) -> None:
    """The same chart through matplotlib (imported here: only non-SVG charts need it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, xs, ys in series:
        if xs:
            ax.plot(xs, ys, label=label, linewidth=1.5, marker="." if len(xs) < 30 else None)
    if note:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", wrap=True)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 and any(xs for _, xs, _ in series):
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_writer(out_path) as f:
        fig.savefig(f, format=out_path.suffix.lstrip(".").lower() or "png")


def _isatty(stream: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool(stream.isatty())
    return False


class ProgressBar:
    """A tqdm bar over environment steps showing steps/s and the recent episode return.

    Disabled (prints nothing) when ``enabled`` is False or ``file`` is not a terminal, so
    logs of batch jobs stay clean.

    Args:
        total_steps: the run's ``total_steps``.
        initial: steps already done (when resuming).
        enabled: ``config.progress``.
        file: stream to draw on (default ``sys.stderr``).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        initial: int = 0,
        enabled: bool = True,
        file: IO[str] | None = None,
    ) -> None:
        from tqdm import tqdm

        file = sys.stderr if file is None else file
        self._stream = file
        self.enabled = bool(enabled) and _isatty(file)
        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            unit="step",
            unit_scale=True,
            dynamic_ncols=True,
            smoothing=0.1,
            file=file,
            disable=not self.enabled,
        )

    def update(
        self, global_step: int, *, episode_return: float | None = None, **extra: float
    ) -> None:
        """Move the bar to ``global_step`` and show ``return=`` and any ``extra`` values."""
        if not self.enabled:
            return
        self._bar.update(max(int(global_step) - self._bar.n, 0))
        postfix = {}
        if episode_return is not None and math.isfinite(episode_return):
            postfix["return"] = f"{episode_return:.1f}"
        postfix.update({k: f"{v:.3g}" for k, v in extra.items()})
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plain print when disabled)."""
        if self.enabled:
            self._bar.write(message)
        else:
            print(message, file=self._stream)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
