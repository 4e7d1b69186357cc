"""trpo.svg_chart: the learning-curve SVG, checked by parsing it back.

Independent references: the linear map of the module docstring recomputed here from the
tick range, the XML parser of the standard library, and hand-picked tick sequences.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from trpo.logger import MetricsLogger, plot_learning_curve
from trpo.svg_chart import line_chart_svg, nice_ticks

NS = "{http://www.w3.org/2000/svg}"


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0.0, 100_000.0, [0.0, 20_000.0, 40_000.0, 60_000.0, 80_000.0, 100_000.0]),
        (-212.1, -142.9, [-220.0, -200.0, -180.0, -160.0, -140.0]),
        (3.0, 3.0, [2.8, 2.9, 3.0, 3.1, 3.2]),
        (0.0, 0.0, [-1.0, -0.5, 0.0, 0.5, 1.0]),
    ],
)
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi, expected):
    ticks = nice_ticks(lo, hi)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= lo and ticks[-1] >= hi


def test_nice_ticks_refuse_bad_ranges():
    for lo, hi in ((1.0, 0.0), (math.nan, 1.0), (0.0, math.inf)):
        with pytest.raises(ValueError, match="finite lo <= hi"):
            nice_ticks(lo, hi)


def test_points_map_linearly_onto_the_plot_box():
    xs, ys = [0.0, 25_000.0, 50_000.0, 100_000.0], [9.0, 120.0, 310.0, 500.0]
    root = ET.fromstring(line_chart_svg([("run", xs, ys)], title="CartPole-v1",
                                        xlabel="global_step", ylabel="return"))
    box = next(e for e in root.iter(f"{NS}rect") if e.get("fill") == "none")
    left, top = float(box.get("x")), float(box.get("y"))
    width, height = float(box.get("width")), float(box.get("height"))
    # The data's span plus matplotlib's default margins: 2% (x) and 5% (y) on each side.
    x_lo, x_hi = -2_000.0, 102_000.0
    y_lo, y_hi = 9.0 - 0.05 * 491.0, 500.0 + 0.05 * 491.0
    (line,) = root.iter(f"{NS}polyline")
    for (px, py), x, y in zip(_points(line), xs, ys, strict=True):
        assert px == pytest.approx(left + (x - x_lo) / (x_hi - x_lo) * width, abs=0.06)
        assert py == pytest.approx(top + (y_hi - y) / (y_hi - y_lo) * height, abs=0.06)
    # Grid lines at the round values inside the range, one label each.
    xlabels = [t.text for t in root.iter(f"{NS}text") if t.get("y") == f"{top + height + 16:.1f}"]
    assert xlabels == ["0", "20k", "40k", "60k", "80k", "100k"]
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert {"CartPole-v1", "global_step", "return", "100k", "500"} <= set(texts)
    assert len(list(root.iter(f"{NS}circle"))) == 4  # short series: a dot per point


def test_several_series_get_a_legend_and_labels_are_escaped():
    long = [float(i) for i in range(40)]
    svg = line_chart_svg([("seed <1> & co", long, long), ("seed 2", [1.0], [2.0])],
                         title="t", xlabel="x", ylabel="y")
    root = ET.fromstring(svg)
    lines = list(root.iter(f"{NS}polyline"))
    assert [e.get("data-label") for e in lines] == ["seed <1> & co", "seed 2"]
    assert {"seed <1> & co", "seed 2"} <= {t.text for t in root.iter(f"{NS}text")}
    assert len(list(root.iter(f"{NS}circle"))) == 1  # only the short series has dots


def test_empty_series_and_bad_input():
    root = ET.fromstring(line_chart_svg([("a", [], [])], title="t", xlabel="x", ylabel="y",
                                        note="no finite y yet in: a"))
    assert not list(root.iter(f"{NS}polyline"))
    assert "no finite y yet in: a" in [t.text for t in root.iter(f"{NS}text")]
    with pytest.raises(ValueError, match="2 x values for 1 y values"):
        line_chart_svg([("a", [0.0, 1.0], [1.0])], title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="NaN or inf"):
        line_chart_svg([("a", [0.0], [math.nan])], title="t", xlabel="x", ylabel="y")


def test_plot_learning_curve_writes_svg_from_the_csv(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as logger:
        for i in range(1, 6):
            logger.log(i * 1000, {"charts/episode_return": i * 10.0})
        logger.log(6000, {"trpo/kl": 0.01})  # no return in this row: skipped
        logger.log(7000, {"charts/episode_return": math.nan})  # non-finite: skipped
    out = plot_learning_curve(tmp_path / "run" / "metrics.csv", tmp_path / "c.svg", title="T")
    (line,) = ET.parse(out).getroot().iter(f"{NS}polyline")
    assert len(_points(line)) == 5
    none = plot_learning_curve(tmp_path / "run" / "metrics.csv", tmp_path / "n.svg",
                               y="eval/episode_return")
    texts = [t.text for t in ET.parse(none).getroot().iter(f"{NS}text")]
    assert "no finite eval/episode_return yet in: run" in texts
