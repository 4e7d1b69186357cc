"""Command line: evaluate the newest valid checkpoint of a run directory.

    python -m trpo.evaluate RUN_DIR [--episodes 10] [--seed 0] [--video] [--allow-import]
        [--max-episode-steps N]

loads the run's ``config.json`` and newest valid checkpoint that fits its env, runs the
deterministic policy (argmax / Gaussian mean) with the observation statistics frozen, prints
the returns, and with ``--video`` writes ``RUN_DIR/eval.gif`` when the env renders rgb arrays.

Every error (missing run directory, no valid checkpoint, a ``module:`` env id without
``--allow-import``, bad flags) is one line on stderr and exit code 2; no traceback.
The library functions are in :mod:`trpo.evaluation` (re-exported here for older callers).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from trpo.config import load_config
from trpo.evaluation import evaluate_policy, load_policy
from trpo.fileio import RunDirError

__all__ = ["evaluate_policy", "load_policy", "main"]

_PROG = "python -m trpo.evaluate"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block + message.
        self.exit(2, f"{_PROG}: error: {message} (see --help)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int ≥ ``low``, else a one-line parser error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="run directory written by python -m trpo.run")
    parser.add_argument("--episodes", type=_int_at_least(1), default=10)
    parser.add_argument("--seed", type=_int_at_least(0), default=0)
    parser.add_argument("--video", action="store_true", help="write RUN_DIR/eval.gif")
    parser.add_argument(
        "--max-episode-steps",
        type=_int_at_least(1),
        default=None,
        help="cap on an episode's steps (default: the env's limit, else 10000)",
    )
    parser.add_argument(
        "--allow-import",
        action="store_true",
        help="let a 'module:Env-v0' env id in the run's config.json import its module "
        "(runs that module's code: only for run directories you trust)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: evaluate the newest valid checkpoint of a run directory.

    Returns:
        0 on success, 2 on any error (printed as one line on stderr).
    """
    args = _parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    saved_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        returns, env_id, video = _run(args, run_dir)
    except (ValueError, RunDirError) as e:  # CheckpointError is a RunDirError
        print(f"{_PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = saved_format
    print(
        f"{env_id}: mean return {np.mean(returns):.1f} ± {np.std(returns):.1f} over "
        f"{len(returns)} episodes"
    )
    if video is not None:
        print(f"video: {video}" if video.exists() else "video: none (see the warning above)")
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    # One line per warning instead of "file:line: Category: message" plus the source line.
    return f"warning: {message}\n"


def _run(args: argparse.Namespace, run_dir: Path) -> tuple[list[float], str, Path | None]:
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a directory")
    actor, obs_rms, env_id = load_policy(run_dir, allow_import=args.allow_import)
    video = run_dir / "eval.gif" if args.video else None
    returns = evaluate_policy(
        actor,
        env_id,
        episodes=args.episodes,
        obs_normalizer=obs_rms,
        seed=args.seed,
        video_path=video,
        max_episode_steps=args.max_episode_steps,
        action_masks=load_config(run_dir).action_masks,  # as in training
    )
    return returns, env_id, video


if __name__ == "__main__":
    sys.exit(main())
