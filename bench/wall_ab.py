"""Whole-run wall time of ``python -m trpo.run`` in two checkouts, alternating.

The issue-12 "1.5× faster than today" comparison: the same command (env preset, seed) run
in an older checkout and in this one, one after the other, ``--rounds`` times, on an
otherwise idle machine; wall = the whole process (imports, envs, training, plot, evaluation).

    git worktree add /tmp/base 68ca2e3
    python bench/wall_ab.py --base /tmp/base --env CartPole-v1 --rounds 5

Prints one line per run with the deterministic evaluation return of each side (a speed-up
that changed the result would show there), the medians, each round's own ratio (base then
this, back to back: the least exposed to the machine's drift) and the ratio of the fastest
runs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_EVAL = re.compile(r"evaluation over \d+ episodes: mean return (\S+)")


def run_once(
    checkout: Path, env: str, seed: int, extra: list[str], runs_root: str
) -> tuple[float, str]:
    """Wall seconds of one ``python -m trpo.run`` in ``checkout``, and its evaluation return."""
    cmd = [sys.executable, "-m", "trpo.run", "--env", env, "--seed", str(seed),
           "--runs-root", runs_root, "--no-progress", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: trpo.run failed:\n{done.stderr[-2000:]}")
    found = _EVAL.search(done.stdout)
    return wall, found.group(1) if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the older checkout")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="further trpo.run flags (both sides), after --")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    walls: dict[str, list[float]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory() as runs_root:
        for r in range(1, args.rounds + 1):
            for side, checkout in (("base", args.base), ("this", here)):
                wall, ret = run_once(checkout, args.env, args.seed, args.extra, runs_root)
                walls[side].append(wall)
                print(f"round {r} {side:4s} {wall:6.2f} s  eval return {ret}", flush=True)
    base, this = statistics.median(walls["base"]), statistics.median(walls["this"])
    print(f"{args.env}: median base {base:.2f} s, this {this:.2f} s, speed-up {base / this:.2f}x")
    # The machine's speed drifts within minutes: each round's own ratio, and their median.
    ratios = [b / t for b, t in zip(walls["base"], walls["this"])]
    print(f"{args.env}: per-round speed-ups {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x, min-time ratio "
          f"{min(walls['base']) / min(walls['this']):.2f}x")


if __name__ == "__main__":
    main()
