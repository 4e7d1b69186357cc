"""Reliability round 2 (issue 13), the parts in ``trpo.train`` and ``trpo.run``:

- item 6: a diverging critic is reported once; an overflowing one is rejected, counted and
  stops the run like any non-finite update;
- item 11: SIGINT / SIGTERM save the last completed update, print how to resume and exit
  130 / 143; a second signal stops at once; ``train`` restores the signal handlers;
- item 13: a device this machine lacks, networks too large for memory, an unusable
  ``log_std_init``: one line and exit code 2, before any env exists;
- item 14: an env raising in ``reset`` (or in its constructor) is a ``TrainingError``;
- item 15: an unwritable ``runs_root``, a read-only run directory or metrics.csv on resume:
  one line before anything trains; a checkpoint write failing (``ulimit -f``): one line.

Runs are tiny CartPole (or test-env) runs: 2 envs × 32 steps per update, an 8-unit MLP;
the CLI cases run in subprocesses, where exit codes and signals are real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
)
from trpo.config import TRPOConfig, load_config
from trpo.interrupt import ImmediateInterrupt, StopOnSignal
from trpo.logger import STEP_COLUMN, read_metrics
from trpo.memory import available_memory_bytes, estimate_rollout_bytes
from trpo.run import main as run_main
from trpo.train import TrainingError, TrainingInterrupted, train

train_module = importlib.import_module("trpo.train")  # `trpo.train` is also a function
ROOT = Path(__file__).resolve().parents[1]
BATCH = 2 * 32
SMALL = dict(
    n_envs=2,
    n_steps=32,
    hidden_sizes=(8,),
    cg_iters=3,
    critic_epochs=1,
    critic_minibatch_size=BATCH,
    eval_episodes=0,
    plot=False,
    progress=False,
    tensorboard=False,
)
SMALL_FLAGS = [
    f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if not isinstance(v, (bool, tuple))
] + ["--hidden-sizes", "8", "--no-plot", "--no-progress", "--no-tensorboard"]


def small_config(tmp_path: Path, name: str, updates: int, **overrides) -> TRPOConfig:
    return TRPOConfig(
        run_name=name,
        runs_root=str(tmp_path),
        total_steps=updates * BATCH,
        **{**SMALL, **overrides},
    )


def cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m trpo.run ARGS`` in a subprocess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "trpo.run", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def one_line_error(stderr: str) -> str:
    """The CLI's stderr must be exactly one line (no traceback); return it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def forbid_envs(monkeypatch):
    """Fail the test if train() gets as far as creating envs."""

    def make_envs(*args, **kwargs):
        raise AssertionError("train() created envs before refusing the run")

    monkeypatch.setattr(train_module, "make_envs", make_envs)


@pytest.fixture
def handlers_kept():
    """The test must leave the SIGINT / SIGTERM handlers as it found them."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before


# --- item 6: a diverging critic ------------------------------------------------------------------
def test_a_diverging_critic_is_reported_once(tmp_path, capsys):
    """critic_lr = 1e10: values of ~1e10 where the rewards (|r| = 1, γ = 0.99) allow at
    most 100. Trains on (finite), warns exactly once, naming critic_lr."""
    result = train(small_config(tmp_path, "diverging", 6, critic_lr=1e10))
    out = capsys.readouterr().out
    assert out.count("the critic is diverging") == 1, out
    assert "Lower critic_lr (now 1e+10)" in out
    losses = result.metrics["trpo/value_loss"]
    assert max(losses) > 1e12  # it did diverge (independently of the watch)
    assert all(math.isfinite(v) for v in losses)


def test_a_sound_critic_is_not_reported(tmp_path, capsys):
    train(small_config(tmp_path, "sound", 6, critic_lr=1e-2))
    assert "diverging" not in capsys.readouterr().out


def test_an_overflowing_critic_is_rejected_and_stops_the_run(tmp_path, capsys):
    """critic_lr = 1e30: the fit's loss overflows float32. Each such update is rejected (the
    critic and its Adam state restored), counted, and after max_consecutive_failures the run
    stops with TrainingError; the saved critic is the last good one, finite."""
    config = small_config(tmp_path, "overflow", 20, critic_lr=1e30, max_consecutive_failures=2)
    with pytest.raises(TrainingError, match=r"2 consecutive updates were non-finite.*critic loss"):
        train(config)
    out = capsys.readouterr().out
    assert "non-finite critic fit rejected, parameters kept (2/2)" in out
    metrics = read_metrics(config.run_dir / "metrics.csv")
    assert metrics["trpo/nonfinite_update"][-2:] == [1.0, 1.0]
    assert metrics["trpo/consecutive_failures"][-2:] == [1, 2]
    saved = load_latest_checkpoint(config.run_dir).state
    assert all(bool(torch.isfinite(v).all()) for v in saved["critic"].values())
    assert saved["update"] == len(metrics[STEP_COLUMN])


# --- item 11: SIGINT / SIGTERM -------------------------------------------------------------------
def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


@contextlib.contextmanager
def started(argv: list[str], cwd: Path):
    """``python ARGV`` running in the background (text pipes) as the leader of its own
    process group, as a terminal starts a command; killed if still alive after."""
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "async_envs"),
    [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)],
    ids=["SIGINT", "SIGTERM", "Ctrl-C to the process group with subprocess envs"],
)
def test_a_signal_saves_the_last_update_and_says_how_to_resume(tmp_path, signum, code, async_envs):
    run_dir = tmp_path / "run"
    args = SMALL_FLAGS + ["--total-steps", str(10_000 * BATCH), "--checkpoint-every", "1000"]
    args += ["--async-envs"] if async_envs else []
    argv = ["-m", "trpo.run", *args, "--runs-root", str(tmp_path), "--run-name", "run"]
    with started(argv, tmp_path) as proc:
        _wait_for(lambda: _metric_rows(run_dir) >= 1, proc, "metrics row")
        assert not list_checkpoints(run_dir)  # checkpoint_every 1000: nothing saved yet
        if async_envs:  # a terminal's Ctrl-C reaches the env workers too
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    saved = load_latest_checkpoint(run_dir).update
    resume_lines = [line for line in err.splitlines() if "--resume" in line]
    assert resume_lines == [
        f"{signal.Signals(signum).name}: stopped after update {saved} (step {saved * BATCH}), "
        f"saved in {checkpoint_path(run_dir, saved)}; resume with: python -m trpo.run "
        f"--resume {run_dir}"
    ], err
    # The checkpoint is that of the last completed (and logged) update.
    rows = read_metrics(run_dir / "metrics.csv")[STEP_COLUMN]
    assert saved >= 1 and rows == [BATCH * (u + 1) for u in range(saved)]

    resumed = cli(["--resume", str(run_dir), "--total-steps", str((saved + 1) * BATCH)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(run_dir / "metrics.csv")[STEP_COLUMN] == [
        BATCH * (u + 1) for u in range(saved + 1)
    ]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    """Update 2 is made to take 60 s (after its rollout); the first Ctrl-C arrives during it
    (a clean stop would wait for its end), the second one stops the run at once."""
    marker = tmp_path / "in_update_2"
    args = SMALL_FLAGS + ["--total-steps", str(100 * BATCH), "--checkpoint-every", "1000"]
    args += ["--runs-root", str(tmp_path), "--run-name", "run"]
    script = textwrap.dedent(
        f"""
        import importlib, pathlib, sys, time
        train_module = importlib.import_module("trpo.train")
        real_update = train_module._update
        def slow_update(config, state, *args):
            if state.update == 1:
                pathlib.Path({str(marker)!r}).touch()
                time.sleep(60)
            return real_update(config, state, *args)
        train_module._update = slow_update
        from trpo.run import main
        sys.exit(main({args!r}))
        """
    )
    with started(["-c", script], tmp_path) as proc:
        _wait_for(marker.exists, proc, "update 2")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first Ctrl-C waits for the update to end
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 30
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("SIGINT received: finishing the current update"), err
    assert lines[1:] == [
        "interrupted: SIGINT received twice: stopped at once without saving; a run continues "
        "from its last checkpoint with --resume RUN_DIR"
    ], err
    assert not list_checkpoints(tmp_path / "run")  # nothing was saved


def test_train_raises_training_interrupted_after_saving(tmp_path, monkeypatch, handlers_kept):
    """From Python: a SIGINT during update 2 ends it, saves ckpt 2 and raises
    TrainingInterrupted carrying the run dir; the handlers are restored."""
    real_update = train_module._update

    def update_then_signal(config, state, *args):
        if state.update == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(config, state, *args)

    monkeypatch.setattr(train_module, "_update", update_then_signal)
    config = small_config(tmp_path, "run", 10, checkpoint_every=100)
    with pytest.raises(TrainingInterrupted, match="stopped after update 2") as info:
        train(config)
    assert info.value.run_dir == config.run_dir and info.value.signum == signal.SIGINT
    assert isinstance(info.value, TrainingError)
    assert [u for u, _ in list_checkpoints(config.run_dir)] == [2]
    assert len(read_metrics(config.run_dir / "metrics.csv")[STEP_COLUMN]) == 2


def test_train_restores_the_signal_handlers(tmp_path, handlers_kept):
    """After a normal return and after an error, SIGINT/SIGTERM behave as before train."""
    train(small_config(tmp_path, "ok", 1))
    with pytest.raises(TrainingError):
        train(small_config(tmp_path, "fails", 5, critic_lr=1e30, max_consecutive_failures=1))


def test_closing_broken_envs_is_a_warning_not_an_error(capsys):
    class BrokenEnvs:
        def close(self):
            raise BrokenPipeError(32, "Broken pipe")

    train_module._close_envs(BrokenEnvs())
    assert "warning: closing the envs failed: BrokenPipeError" in capsys.readouterr().err


def test_stop_on_signal_records_the_first_and_raises_on_the_second(handlers_kept, capsys):
    with StopOnSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(ImmediateInterrupt) as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        assert info.value.signum == signal.SIGINT
        assert isinstance(info.value, KeyboardInterrupt)
    assert "SIGTERM received: finishing the current update" in capsys.readouterr().err


# --- item 13: devices, networks too large, log_std_init ------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_before_any_env(tmp_path, forbid_envs):
    proc = cli(SMALL_FLAGS + ["--device", "cuda", "--runs-root", str(tmp_path / "runs")], tmp_path)
    assert proc.returncode == 2
    assert "device 'cuda' is not available" in one_line_error(proc.stderr)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        train(small_config(tmp_path, "x", 1, device="cuda"))  # forbid_envs: before any env


def test_networks_too_large_for_memory_are_refused_in_one_line(tmp_path, forbid_envs):
    """50000 × 50000 hidden units: ~10 GB per copy of the weights; the check counts weights,
    gradients, Adam's moments and the CG vectors, ~40 copies over actor and critic."""
    need = estimate_rollout_bytes(TRPOConfig(hidden_sizes=(50_000, 50_000)), 1, 1)
    available = available_memory_bytes()
    if available is None or need <= available:
        pytest.skip("this machine could hold the networks")
    args = SMALL_FLAGS + ["--hidden-sizes", "50000", "50000", "--runs-root", str(tmp_path / "r")]
    proc = cli(args, tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "available host memory" in line and "or hidden_sizes" in line
    assert not (tmp_path / "r").exists()


def test_an_overflowing_log_std_init_is_refused_naming_the_field(tmp_path):
    proc = cli(SMALL_FLAGS + ["--log-std-init", "1e300", "--runs-root", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert "log_std_init must be in [-20, 20] (got 1e+300)" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- item 14: an env raising in reset or in its constructor --------------------------------------
class ResetRaisingEnv(gym.Env):
    """A 2-D env whose ``reset`` raises (``in_reset``) or whose constructor does."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, where: str = "in_reset"):
        if where == "in_init":
            raise OSError("simulator library not found")

    def reset(self, *, seed=None, options=None):
        raise RuntimeError("reset exploded")

    def step(self, action):  # pragma: no cover - never reached
        raise AssertionError


@pytest.fixture
def raising_env():
    ids = []

    def register(where: str) -> str:
        env_id = f"ResetRaising{where.title().replace('_', '')}-v0"
        gym.register(env_id, entry_point=ResetRaisingEnv, kwargs=dict(where=where))
        ids.append(env_id)
        return env_id

    yield register
    for env_id in ids:
        gym.registry.pop(env_id, None)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("in_reset", r"failed in reset \(seed \d+\): RuntimeError: reset exploded"),
        ("in_init", "could not be created: OSError: simulator library not found"),
    ],
)
def test_an_env_raising_in_reset_or_init_is_a_training_error(tmp_path, raising_env, where, message):
    env_id = raising_env(where)
    with pytest.raises(TrainingError, match=rf"env '{env_id}' {message}") as info:
        train(small_config(tmp_path, "py", 2, env_id=env_id))
    assert info.value.__cause__ is not None  # the original error is chained
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(
            SMALL_FLAGS + ["--env-id", env_id, "--runs-root", str(tmp_path), "--run-name", "cli"]
        )
    assert code == 1
    assert f"error: env '{env_id}'" in one_line_error(err.getvalue())


# --- item 15: unwritable runs_root, read-only run directory on resume ----------------------------
def test_an_unwritable_runs_root_is_one_line_before_training(tmp_path):
    """``runs_root`` below a regular file cannot be created, not even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = cli(SMALL_FLAGS + ["--runs-root", str(blocker / "runs")], tmp_path)
    assert proc.returncode == 2
    assert f"cannot create a run directory in {blocker / 'runs'}" in one_line_error(proc.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes regardless of permissions")
def test_a_read_only_runs_root_is_one_line_before_training(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    root.chmod(0o555)
    try:
        proc = cli(SMALL_FLAGS + ["--runs-root", str(root)], tmp_path)
    finally:
        root.chmod(0o755)
    assert proc.returncode == 2
    assert "cannot create a run directory" in one_line_error(proc.stderr)


def test_exceeding_the_file_size_limit_is_one_line(tmp_path):
    """``ulimit -f`` of 6000 bytes: config.json and the first metrics row fit, the first
    checkpoint does not (EFBIG; Python ignores SIGXFSZ, so the write raises)."""
    limit = 6000
    args = SMALL_FLAGS + ["--total-steps", str(3 * BATCH), "--checkpoint-every", "1"]
    args += ["--runs-root", str(tmp_path), "--run-name", "r"]
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from trpo.run import main
        sys.exit(main({args!r}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The checkpoint writer's own CheckpointError (a RunDirError: exit 2) names the file.
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert line.startswith("error: checkpoint not saved: cannot write ")
    assert str(tmp_path / "r" / "checkpoints") in line
    assert "File too large" in line and "ulimit -f" in line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 2 updates with its checkpoint 2 (copied by each test)."""
    root = tmp_path_factory.mktemp("runs")
    return train(small_config(root, "done", 2)).run_dir


def _read_only(monkeypatch, run_dir: Path, target: str, how: str) -> Path:
    """Make ``run_dir/target`` read-only: really (``chmod``, skipped as root, who writes
    anyway) or as seen by ``os.access`` (what the check asks; root's view cannot be
    restricted otherwise)."""
    path = run_dir / target
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes regardless of permissions")
        path.chmod(0o555 if path.is_dir() else 0o444)
    else:
        real_access = os.access

        def access(p, mode, *args, **kwargs):
            if Path(p) == path and mode & os.W_OK:
                return False
            return real_access(p, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return path


@pytest.mark.parametrize("how", ["chmod", "access"])
@pytest.mark.parametrize("target", ["", "metrics.csv", "checkpoints"])
def test_a_read_only_run_is_refused_before_an_update_is_trained(
    tmp_path, finished_run, monkeypatch, target, how
):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished_run), str(run_dir)], check=True)
    before = (run_dir / "metrics.csv").read_text(), sorted(os.listdir(run_dir / "checkpoints"))
    path = _read_only(monkeypatch, run_dir, target, how)
    updates = []
    monkeypatch.setattr(train_module, "_update", lambda *a: updates.append(a) or None)
    config = dataclasses.replace(load_config(run_dir), resume=str(run_dir), total_steps=4 * BATCH)
    try:
        with pytest.raises(ValueError, match=rf"cannot resume {run_dir}: {path} is not writable"):
            train(config)
    finally:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert not updates  # refused before an update was trained
    assert ((run_dir / "metrics.csv").read_text(), sorted(os.listdir(run_dir / "checkpoints"))) == (
        before
    )
    assert load_checkpoint(list_checkpoints(run_dir)[0][1])["update"] == 2
