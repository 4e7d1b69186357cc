"""Metrics of a run: a CSV (always), TensorBoard events (when installed), a learning curve
PNG, and a progress bar.

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
from typing import IO, Any

__all__ = [
    "CSV_FILENAME",
    "METRIC_KEYS",
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


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], bool]:
    """Header, complete rows, and whether a last line cut short (no newline) was dropped."""
    text = path.read_text()
    partial = bool(text) and not text.endswith("\n")
    if partial:
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(text.splitlines()))
    header = lines[0] if lines else []
    return header, [row for row in lines[1:] if row], partial


def _write_csv_atomic(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Append metric rows to ``run_dir/metrics.csv`` and, optionally, TensorBoard.

    CSV columns are ``global_step`` then every key in first-logged order. A row lacking a key
    leaves its cell empty. When a new key appears the file is rewritten once with the wider
    header (old rows get empty cells), so any CSV reader sees one consistent table. Each row
    is flushed to the OS as soon as it is logged, so a killed run keeps every logged row.

    Resuming: pass ``resume_step`` (the ``global_step`` of the checkpoint resumed from). Rows
    with a larger step, logged after that checkpoint and about to be produced again, are
    removed from the CSV, and TensorBoard purges its events after that step.

    Args:
        run_dir: directory of the run (created if needed).
        tensorboard: also write TensorBoard events to ``run_dir/tensorboard`` if
            ``torch.utils.tensorboard`` (the ``tensorboard`` package) can be imported;
            otherwise silently CSV only (see :attr:`tensorboard_enabled`).
        resume_step: drop rows after this step (see above); None = keep every existing row.
        flush_secs: TensorBoard flush interval in seconds.
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / CSV_FILENAME
        self._columns: list[str] = []
        fresh = True
        if self.csv_path.exists() and self.csv_path.stat().st_size > 0:
            fresh = False
            header, rows, partial = _read_csv(self.csv_path)
            if not header or header[0] != STEP_COLUMN:
                raise ValueError(
                    f"{self.csv_path} is not a metrics CSV (first column "
                    f"{header[:1]!r}, expected {STEP_COLUMN!r})"
                )
            self._columns = header[1:]
            kept = rows
            if resume_step is not None:
                kept = [r for r in rows if _parse(r[0]) <= resume_step]
            if partial or len(kept) != len(rows):  # drop a row cut by a kill, or purged rows
                _write_csv_atomic(self.csv_path, header, kept)
        self._file: IO[str] | None = open(self.csv_path, "a", newline="")
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow([STEP_COLUMN])
            self._file.flush()
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
        self._writer.writerow([int(step)] + [_format(values.get(k)) for k in self._columns])
        self._file.flush()
        if self._tb is not None:
            for key, v in values.items():
                self._tb.add_scalar(key, v, int(step))

    def _widen(self, new_keys: list[str]) -> None:
        """Rewrite the CSV with ``new_keys`` appended to the header."""
        if self._file is not None:
            self._file.close()
        _, rows, _ = _read_csv(self.csv_path)
        self._columns.extend(new_keys)
        pad = [""] * len(new_keys)
        _write_csv_atomic(self.csv_path, [STEP_COLUMN, *self._columns], [r + pad for r in rows])
        self._file = open(self.csv_path, "a", newline="")
        self._writer = csv.writer(self._file)

    def flush(self) -> None:
        """Push buffered CSV rows and TensorBoard events to disk."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; further :meth:`log` calls raise. Idempotent."""
        if self._file is not None:
            self.flush()
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
    NaN where a row had no value (or logged NaN)."""
    header, rows, _ = _read_csv(Path(csv_path))
    columns: dict[str, list[Any]] = {name: [] for name in header}
    for row in rows:
        row = row + [""] * (len(header) - len(row))
        for name, cell in zip(header, row):
            v = _parse(cell)
            columns[name].append(int(v) if name == STEP_COLUMN else float(v))
    return columns


def plot_learning_curve(
    csv_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    png_path: str | os.PathLike[str],
    *,
    x: str = STEP_COLUMN,
    y: str = "charts/episode_return",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot ``y`` against ``x`` from one or several metrics CSVs (one line each) into a PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no display, no global state). Rows
    where ``y`` is missing or non-finite are skipped; a run without any point is noted in the
    figure instead of failing, so a short run still gets its PNG.

    Returns:
        ``png_path`` as a ``Path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = [csv_paths] if isinstance(csv_paths, (str, os.PathLike)) else list(csv_paths)
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels has {len(labels)} entries for {len(paths)} CSV files")
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    empty = []
    for i, path in enumerate(paths):
        cols = read_metrics(path)
        pts = [
            (a, b)
            for a, b in zip(cols.get(x, []), cols.get(y, []))
            if math.isfinite(a) and math.isfinite(b)
        ]
        label = labels[i] if labels is not None else Path(path).parent.name or str(path)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, linewidth=1.5, marker="." if len(pts) < 30 else None)
        else:
            empty.append(label)
    if empty:
        ax.text(
            0.5,
            0.5,
            f"no finite {y} yet in: {', '.join(empty)}",
            transform=ax.transAxes,
            ha="center",
            va="center",
            wrap=True,
        )
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or y)
    ax.grid(True, alpha=0.3)
    if len(paths) > 1 and len(empty) < len(paths):
        ax.legend(fontsize="small")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path


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
