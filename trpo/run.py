"""Command line: ``python -m trpo.run [--env-id CartPole-v1] [--total-steps N] ...``.

Every field of :class:`trpo.config.TRPOConfig` is a flag, generated from the dataclass by
tyro (``--help`` lists them with their docstrings and defaults, which include the preset of the
chosen env); ``--env`` is short for ``--env-id``. ``--resume RUN_DIR`` continues a run under its
saved ``config.json``, overridden by the flags typed; a new run's ``--run-name`` must not exist.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Sequence

import tyro

from trpo.config import TRPOConfig, check_device, check_env_id, load_config, resume_config
from trpo.fileio import RunDirError
from trpo.interrupt import exit_code
from trpo.logger import TENSORBOARD_DIRNAME
from trpo.presets import config_for
from trpo.train import TrainingError, TrainingInterrupted, train

__all__ = ["main", "parse_cli"]

_ENV_FLAGS = ("--env", "--env-id", "--env_id")
_BACKEND_FLAGS = ("--env-backend", "--env_backend")


def _scan_flag(argv: Sequence[str], flags: Sequence[str]) -> str | None:
    """Value of the last ``--flag VALUE`` / ``--flag=VALUE`` in ``argv`` (argparse: last wins)."""
    value = None
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if tok in flags and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        else:
            for f in flags:
                if tok.startswith(f + "="):
                    value = tok[len(f) + 1 :]
    return value


def _exit_with(error: ValueError) -> SystemExit:
    print(f"error: {error}", file=sys.stderr)
    return SystemExit(2)


def parse_cli(argv: Sequence[str] | None = None, *, prog: str | None = None) -> TRPOConfig:
    """Build a :class:`TRPOConfig` from command-line flags named after the fields.

    ``--env-id`` (alias ``--env``) and ``--env-backend`` are read first to pick the preset
    (:func:`trpo.presets.config_for`), which then serves as the defaults shown by ``--help``;
    any flag the user typed overrides it. With
    ``--resume RUN_DIR`` the run's saved ``config.json`` is the base instead, and the typed
    flags that change it are the given fields :func:`trpo.config.resume_config` applies
    (e.g. a larger ``--total-steps``); the env and the networks may not change.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
        prog: program name shown in the usage line.

    Raises:
        SystemExit: on ``--help`` (code 0) or a bad flag or value (code 2, after printing a
            message that names the field).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    env_id = _scan_flag(argv, _ENV_FLAGS)
    backend = _scan_flag(argv, _BACKEND_FLAGS)
    resume = _scan_flag(argv, ("--resume",))
    try:
        if resume is not None and resume != "None":
            base = dataclasses.replace(load_config(resume), resume=resume)
        else:
            # The backend picks its preset too (trpo.presets.BACKEND_PRESETS).
            given = {} if backend is None else {"env_backend": backend}
            base = config_for(env_id or TRPOConfig.env_id, **given)
    except ValueError as e:
        raise _exit_with(e) from None
    config = tyro.cli(TRPOConfig, args=argv, default=base, prog=prog)
    if config.resume is None:
        return config
    # Against the saved config, a typed flag that changes nothing overrides nothing either.
    names = (f.name for f in dataclasses.fields(config))
    typed = {name for name in names if getattr(config, name) != getattr(base, name)}
    try:
        return resume_config(config.with_given(typed | {"resume"}))
    except ValueError as e:
        raise _exit_with(e) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, train, and print where the artifacts are.

    Returns:
        0 on success, 1 when training stopped (:class:`trpo.train.TrainingError`), 2 for a
        user error: an unknown env id, a device this machine lacks, a batch that cannot fit
        in memory, a run name that exists, a runs_root or resumed run that cannot be
        written, no valid checkpoint to resume (one line, not a traceback). Invalid flags or
        values exit with code 2 from the parser, naming the field. SIGINT (Ctrl-C) / SIGTERM:
        the last completed update is saved, one line says how to resume, and the code is
        130 / 143 (``128 + signal``); a second one stops at once with the same code.
    """
    config = parse_cli(argv, prog="python -m trpo.run")
    try:
        # train() checks them too; here a typo gives one line that says how to list the ids.
        check_env_id(config.env_id)
        check_device(config.device)
        result = train(config)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return exit_code(e.signum)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second signal, or one outside the training loop
        print(
            f"interrupted: {e or 'KeyboardInterrupt'}; a run continues from its last "
            "checkpoint with --resume RUN_DIR",
            file=sys.stderr,
        )
        return exit_code(getattr(e, "signum", signal.SIGINT))
    except (ValueError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    artifacts = ["config.json", "metrics.csv", "checkpoints/"]
    if config.plot:
        artifacts.append("learning_curve.svg")
    if (result.run_dir / TENSORBOARD_DIRNAME).is_dir():
        artifacts.append(f"{TENSORBOARD_DIRNAME}/")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone wrote them
        print(f"artifacts in {result.run_dir}: {', '.join(artifacts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
