"""Learning results: train several seeds of one env with its preset and report the scores.

    python bench/learning_runs.py --env CartPole-v1 --seeds 1 2 3 [--total-steps N] [--jobs 2]

Each seed is one ``python -m trpo.run`` process (``--torch-threads 1``); ``--jobs`` runs that
many at once. Score = the final deterministic evaluation over 10 episodes, averaged over
seeds. Writes ``<out>/<env>_summary.json`` and ``<out>/<env>_curves.png`` (training-episode
return against env steps, one line per seed) and prints a Markdown row for
docs/benchmarks.md. Never time anything else while this runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from trpo.logger import plot_learning_curve

_EVAL_RE = re.compile(r"evaluation over (\d+) episodes: mean return (-?[\d.]+)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--total-steps", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("extra", nargs="*", help="further trpo.run flags after --")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pending = list(args.seeds)
    running: dict[int, tuple[subprocess.Popen, float, Path]] = {}
    results: dict[int, dict] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            name = f"{args.env}__seed{seed}"
            cmd = [
                sys.executable,
                "-m",
                "trpo.run",
                "--env-id",
                args.env,
                "--seed",
                str(seed),
                "--runs-root",
                str(out),
                "--run-name",
                name,
                "--no-progress",
                "--torch-threads",
                "1",
                *args.extra,
            ]
            if args.total_steps:
                cmd += ["--total-steps", str(args.total_steps)]
            log = (out / f"{name}.log").open("w")
            running[seed] = (
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                time.perf_counter(),
                out / name,
            )
        time.sleep(1.0)
        for seed, (proc, t0, run_dir) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[seed]
            text = (out / f"{args.env}__seed{seed}.log").read_text()
            match = _EVAL_RE.search(text)
            results[seed] = {
                "seed": seed,
                "returncode": proc.returncode,
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "eval_mean": float(match.group(2)) if match else None,
                "run_dir": str(run_dir),
            }
            print(json.dumps(results[seed]), flush=True)

    scores = [r["eval_mean"] for r in results.values() if r["eval_mean"] is not None]
    summary = {
        "env": args.env,
        "seeds": sorted(results),
        "scores": scores,
        "mean": float(np.mean(scores)) if scores else None,
        "std": float(np.std(scores)) if scores else None,
        "runs": [results[s] for s in sorted(results)],
    }
    (out / f"{args.env}_summary.json").write_text(json.dumps(summary, indent=2))
    csvs = [Path(results[s]["run_dir"]) / "metrics.csv" for s in sorted(results)]
    plot_learning_curve(
        [c for c in csvs if c.exists()],
        out / f"{args.env}_curves.png",
        labels=[
            f"seed {s}"
            for s in sorted(results)
            if (Path(results[s]["run_dir"]) / "metrics.csv").exists()
        ],
        title=f"TRPO (natgrad) on {args.env}",
    )
    walls = [r["wall_seconds"] for r in results.values()]
    print(
        f"| {args.env} | {len(scores)} | {summary['mean']:.1f} ± {summary['std']:.1f} | "
        f"{', '.join(f'{s:.1f}' for s in scores)} | {np.mean(walls):.0f} s |"
    )
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
