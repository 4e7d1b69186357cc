"""pytest-benchmark configuration of the suites in bench/ (not collected by the root tests).

Run::

    pytest bench/ --benchmark-only --benchmark-group-by=param

Every benchmark is parametrised over ``device`` (``cpu``, ``cuda``: skipped without a GPU)
and ``case`` (``<size>@<batch>``, see ``bench_problems``). With ``--benchmark-group-by=param``
the groups ignore the device, so each table holds the CPU and the GPU rows of one case; a
compact summary (median ms, CPU/GPU ratio, multiples of one surrogate gradient) is printed
at the end.

Selection (deselected, not skipped): on CPU, by default, only ``hopper@2k`` and
``cheetah@25k`` (a few minutes on 2 cores); ``--bench-big`` (or ``BENCH_BIG=1``) adds every
size × batch. On CUDA every case runs, plus ``huge@200k`` for the tests that allow it.
``--bench-threads N`` (or ``BENCH_THREADS``, default 1) pins ``torch.set_num_threads``;
``BENCH_TARGET_S`` (default 1.0) is the time each benchmark spends in timed rounds (at least
3 rounds, at most 30, after one warm-up call).
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from bench_problems import CASES, synced

CPU_DEFAULT = ("hopper@2k", "cheetah@25k")
_RESULTS: dict[tuple[str, str, str], float] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("natgrad bench")
    group.addoption(
        "--bench-big",
        action="store_true",
        default=os.environ.get("BENCH_BIG", "") not in ("", "0"),
        help="CPU: run every size x batch (slow), not only hopper@2k and cheetah@25k",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", "1")),
        help="torch.set_num_threads for the benchmarks (default 1)",
    )
    group.addoption(
        "--bench-cases",
        default=os.environ.get("BENCH_CASES", ""),
        help="comma-separated cases to run (overrides the default selection)",
    )


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(config.getoption("--bench-threads"))
    config.addinivalue_line("markers", "huge_ok: the benchmark also runs the huge@200k case")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=no_gpu)])
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES)


def _selected(config: pytest.Config, item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    case, device = params.get("case"), params.get("device")
    if case is None:
        return True
    chosen = [c for c in config.getoption("--bench-cases").split(",") if c]
    if chosen:
        return case in chosen
    if case.startswith("huge@"):
        return device == "cuda" and item.get_closest_marker("huge_ok") is not None
    return device == "cuda" or config.getoption("--bench-big") or case in CPU_DEFAULT


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        (keep if _selected(config, item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """``--benchmark-group-by=param``: group by every parameter but the device."""
    if group_by != "param":
        return None
    groups: dict[str, list] = defaultdict(list)
    for bench in benchmarks:
        params = bench["params"] or {}
        key = " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "device")
        groups[key].append(bench)
    for members in groups.values():
        members.sort(key=lambda b: b["name"])
    return sorted(groups.items())


class Bench:
    """Runs a benchmark (synchronising CUDA after each call) and records its median."""

    def __init__(self, benchmark: Any, case: str, device: str) -> None:
        self.benchmark, self.case, self.device = benchmark, case, device

    def __call__(
        self,
        op: str,
        fn: Callable[[], Any],
        *,
        setup: Callable[[], None] | None = None,
        target_seconds: float | None = None,
        max_rounds: int = 30,
    ) -> Any:
        run = synced(fn, torch.device(self.device))
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        run()  # warm-up (also sizes the number of rounds)
        once = max(time.perf_counter() - t0, 1e-6)
        if target_seconds is None:
            target_seconds = float(os.environ.get("BENCH_TARGET_S", "1.0"))
        rounds = max(3, min(max_rounds, int(target_seconds / once)))
        self.benchmark.extra_info["op"] = op
        result = self.benchmark.pedantic(
            run,
            setup=setup,
            rounds=rounds,
            iterations=1,
            warmup_rounds=1 if setup is None else 0,
        )
        self.record(op, self.benchmark.stats.stats.median)
        return result

    def record(self, op: str, seconds: float) -> None:
        """A derived timing for the summary, also kept in the JSON (``extra_info``)."""
        _RESULTS[(self.case, op, self.device)] = seconds
        if op != self.benchmark.extra_info.get("op"):
            self.benchmark.extra_info[f"{op}_s"] = seconds


@pytest.fixture
def bench(benchmark: Any, case: str, device: str) -> Bench:
    return Bench(benchmark, case, device)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    tr.write_sep("=", "natgrad bench: median ms, CPU vs GPU, x one surrogate gradient")
    tr.write_line(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu "
        f"{platform.processor() or platform.machine()} x{os.cpu_count()}, cuda {cuda}, load "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    cases = sorted({c for c, _, _ in _RESULTS}, key=lambda c: (CASES + [c]).index(c))
    for case in cases:
        ops = sorted({o for c, o, _ in _RESULTS if c == case})
        grad = {d: _RESULTS.get((case, "grad", d)) for d in ("cpu", "cuda")}
        tr.write_line("")
        tr.write_line(
            f"{case:<16} {'cpu ms':>10} {'cuda ms':>10} {'cpu/cuda':>9} {'x grad cpu':>11} "
            f"{'x grad cuda':>11}"
        )
        for op in ops:
            t = {d: _RESULTS.get((case, op, d)) for d in ("cpu", "cuda")}
            cells = [_ms(t["cpu"]), _ms(t["cuda"])]
            cells.append(f"{t['cpu'] / t['cuda']:9.1f}" if t["cpu"] and t["cuda"] else f"{'':>9}")
            for d in ("cpu", "cuda"):
                ok = t[d] and grad[d]
                cells.append(f"{t[d] / grad[d]:11.2f}" if ok else f"{'':>11}")
            tr.write_line(f"  {op:<14} " + " ".join(cells))


def _ms(seconds: float | None) -> str:
    return f"{1e3 * seconds:10.2f}" if seconds else f"{'-':>10}"
