"""Tests of trpo.logger: CSV rows, key growth, resume, TensorBoard (optional), plots, progress."""

from __future__ import annotations

import csv
import io
import math
import sys

import numpy as np
import pytest
import torch

from trpo.logger import (
    METRIC_KEYS,
    MetricsLogger,
    ProgressBar,
    is_timing_key,
    plot_learning_curve,
    read_metrics,
)


def _raw_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_rows_read_back_bit_identical(tmp_path):
    values = [0.1 + 0.2, 1 / 3, 1e-300, -2.5e17, math.pi]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for i, v in enumerate(values):
            logger.log(1024 * (i + 1), {"trpo/kl": v, "charts/update": i + 1})
    cols = read_metrics(tmp_path / "metrics.csv")
    assert cols["global_step"] == [1024, 2048, 3072, 4096, 5120]
    assert cols["trpo/kl"] == values  # exact: repr(float) round-trips
    assert cols["charts/update"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert _raw_rows(tmp_path / "metrics.csv")[0] == ["global_step", "trpo/kl", "charts/update"]


def test_values_are_converted_and_validated(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(
            1,
            {
                "a": torch.tensor(0.5, dtype=torch.float64),
                "b": np.float32(0.25),
                "c": np.int64(7),
                "d": True,
                "e": float("nan"),
                "f": float("-inf"),
                "g": None,  # no value: the key is not even a column yet
                "h": torch.tensor([3]),
            },
        )
        for bad in ({"x": torch.ones(2)}, {"x": "text"}, {"": 1.0}, {"global_step": 1.0}):
            with pytest.raises(ValueError):
                logger.log(2, bad)
        with pytest.raises(ValueError, match="step"):
            logger.log(-1, {"a": 1.0})
    with pytest.raises(ValueError, match="closed"):
        logger.log(3, {"a": 1.0})
    header, row = _raw_rows(tmp_path / "metrics.csv")
    assert header == ["global_step", "a", "b", "c", "d", "e", "f", "h"]
    assert row == ["1", "0.5", "0.25", "7", "1", "nan", "-inf", "3"]


def test_new_keys_widen_the_header_and_old_rows_stay_aligned(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(100, {"trpo/kl": 0.01})
        logger.log(200, {"trpo/kl": 0.02, "charts/episode_return": 20.0})
        logger.log(300, {"eval/episode_return": 500.0})
        assert logger.columns == ["trpo/kl", "charts/episode_return", "eval/episode_return"]
    rows = _raw_rows(tmp_path / "metrics.csv")
    assert all(len(r) == 4 for r in rows)
    assert rows[1:] == [
        ["100", "0.01", "", ""],
        ["200", "0.02", "20.0", ""],
        ["300", "", "", "500.0"],
    ]
    cols = read_metrics(tmp_path / "metrics.csv")
    assert math.isnan(cols["charts/episode_return"][0]) and cols["eval/episode_return"][2] == 500


def test_reopening_appends_and_resume_drops_rows_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in (100, 200, 300):
            logger.log(step, {"m": step / 100})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # no resume: append
        logger.log(400, {"m": 4.0, "n": 1.0})
        logger.log(500, {"m": 5.0})
    assert read_metrics(tmp_path / "metrics.csv")["global_step"] == [100, 200, 300, 400, 500]
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=300) as logger:
        assert logger.columns == ["m", "n"]
        logger.log(400, {"m": 40.0})
    cols = read_metrics(tmp_path / "metrics.csv")
    assert cols["global_step"] == [100, 200, 300, 400]
    assert cols["m"] == [1.0, 2.0, 3.0, 40.0]


def test_a_row_cut_short_by_a_kill_is_dropped(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(100, {"m": 1.0, "n": 2.0})
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("200,0.12")  # killed mid-write: no newline
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(200, {"m": 3.0, "n": 4.0})
    assert _raw_rows(tmp_path / "metrics.csv")[1:] == [["100", "1.0", "2.0"], ["200", "3.0", "4.0"]]


def test_a_foreign_csv_is_not_clobbered(tmp_path):
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a metrics CSV"):
        MetricsLogger(tmp_path, tensorboard=False)
    assert (tmp_path / "metrics.csv").read_text() == "a,b\n1,2\n"
    with pytest.raises(ValueError, match="resume_step"):
        MetricsLogger(tmp_path / "x", tensorboard=False, resume_step=-1)


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        assert logger.tensorboard_enabled
        logger.log(1024, {"trpo/kl": 0.005, "charts/episode_return": 22.0})
        logger.log(2048, {"trpo/kl": 0.0075})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    kl = acc.Scalars("trpo/kl")  # TensorBoard stores float32
    assert [(e.step, e.value) for e in kl] == [
        (1024, np.float32(0.005)),
        (2048, np.float32(0.0075)),
    ]
    assert [e.value for e in acc.Scalars("charts/episode_return")] == [22.0]


def test_tensorboard_resume_purges_events_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"m": float(step)})
    with MetricsLogger(tmp_path, tensorboard=True, resume_step=1) as logger:
        logger.log(2, {"m": 20.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("m")] == [(1, 1.0), (2, 20.0)]


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        assert not logger.tensorboard_enabled
        logger.log(1, {"trpo/kl": 0.001})
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path / "metrics.csv")["trpo/kl"] == [0.001]


def test_metric_keys_document_the_stable_names():
    required = {
        "charts/episode_return",
        "charts/episode_length",
        "charts/steps_per_second",
        "trpo/kl",
        "trpo/surrogate_improvement",
        "trpo/expected_improvement",
        "trpo/step_fraction",
        "trpo/line_search_success",
        "trpo/line_search_tries",
        "natgrad/cg_iterations",
        "natgrad/cg_residual",
        "trpo/entropy",
        "trpo/explained_variance",
        "trpo/value_loss",
        "time/rollout_seconds",
        "time/update_seconds",
    }
    assert required <= set(METRIC_KEYS)
    assert all(isinstance(v, str) and v for v in METRIC_KEYS.values())
    assert all(k.count("/") == 1 for k in METRIC_KEYS)
    timing = {k for k in METRIC_KEYS if is_timing_key(k)}
    assert timing == {
        "charts/steps_per_second",
        "time/rollout_seconds",
        "time/update_seconds",
        "time/policy_step_seconds",
        "time/critic_seconds",
        "time/elapsed_seconds",
    }


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_learning_curve(tmp_path):
    for run, scale in (("a", 1.0), ("b", 2.0)):
        with MetricsLogger(tmp_path / run, tensorboard=False) as logger:
            for i in range(1, 6):
                logger.log(i * 1000, {"charts/episode_return": scale * i * 10.0})
            logger.log(6000, {"trpo/kl": 0.01})  # a row without a return is skipped
    png = plot_learning_curve(tmp_path / "a" / "metrics.csv", tmp_path / "out" / "curve.png")
    _assert_png(png)
    png2 = plot_learning_curve(
        [tmp_path / "a" / "metrics.csv", tmp_path / "b" / "metrics.csv"],
        tmp_path / "both.png",
        labels=["seed 1", "seed 2"],
        y="charts/episode_return",
    )
    _assert_png(png2)
    # A run that has not finished an episode yet still gets its PNG.
    _assert_png(
        plot_learning_curve(
            tmp_path / "a" / "metrics.csv", tmp_path / "none.png", y="eval/episode_return"
        )
    )
    with pytest.raises(ValueError, match="labels"):
        plot_learning_curve([tmp_path / "a" / "metrics.csv"], tmp_path / "x.png", labels=[])


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal():
    quiet = io.StringIO()
    with ProgressBar(10_000, file=quiet) as bar:
        assert not bar.enabled
        bar.update(5000, episode_return=42.0)
        bar.write("note")
    assert quiet.getvalue() == "note\n"

    tty = _FakeTTY()
    with ProgressBar(10_000, initial=1000, file=tty) as bar:
        assert bar.enabled
        bar.update(5000, episode_return=42.0, kl=0.0071)
        bar.update(10_000, episode_return=float("nan"))
    out = tty.getvalue()
    assert "10.0k/10.0k" in out and "return=42.0" in out and "kl=0.0071" in out

    off = _FakeTTY()
    with ProgressBar(10, enabled=False, file=off) as bar:
        bar.update(5)
    assert off.getvalue() == ""
