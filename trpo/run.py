"""Command line: ``python -m trpo.run [--env-id CartPole-v1] [--total-steps N] ...``.

Every field of :class:`trpo.config.TRPOConfig` is a flag (``--help`` lists them with their
defaults, which include the preset of the chosen env); ``--env`` is short for ``--env-id``
and ``--resume RUN_DIR`` continues a run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from trpo.config import parse_cli
from trpo.train import TrainingError, train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, train, and print where the artifacts are."""
    config = parse_cli(argv, prog="python -m trpo.run")
    try:
        result = train(config)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"artifacts in {result.run_dir}: config.json, metrics.csv, checkpoints/"
        + (", learning_curve.png" if config.plot else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
