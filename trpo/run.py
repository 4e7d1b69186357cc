"""Command line: ``python -m trpo.run [--env-id CartPole-v1] [--total-steps N] ...``.

Every field of :class:`trpo.config.TRPOConfig` is a flag (``--help`` lists them with their
defaults, which include the preset of the chosen env); ``--env`` is short for ``--env-id``
and ``--resume RUN_DIR`` continues a run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from trpo.checkpoint import CheckpointError
from trpo.config import MemoryBudgetError, check_env_id, parse_cli
from trpo.logger import TENSORBOARD_DIRNAME
from trpo.train import TrainingError, train

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, train, and print where the artifacts are.

    Returns:
        0 on success, 1 when training stopped (:class:`trpo.train.TrainingError`), 2 for an
        unknown env id, a batch that cannot fit in memory or no valid checkpoint to resume (a message, not a traceback).
        Invalid flags or values exit with code 2 from the parser, naming the field.
    """
    config = parse_cli(argv, prog="python -m trpo.run")
    try:
        # train() checks it too; here a typo gives one line that says how to list the ids.
        check_env_id(config.env_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config, merge_saved=False)  # parse_cli merged config.json already
    except (MemoryBudgetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    artifacts = ["config.json", "metrics.csv", "checkpoints/"]
    if config.plot:
        artifacts.append("learning_curve.png")
    if (result.run_dir / TENSORBOARD_DIRNAME).is_dir():
        artifacts.append(f"{TENSORBOARD_DIRNAME}/")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone wrote them
        print(f"artifacts in {result.run_dir}: {', '.join(artifacts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
