"""The fault matrix of issue 6, one test (or parametrised group) per row, through ``train``.

Rows (docs/reliability.md has the table):

1. kill mid-run (SIGKILL during training, during a checkpoint write) → ``--resume``;
2. corrupted / truncated checkpoint → named, resume falls back;
3. untrusted checkpoint (crafted pickle) → refused at resume, never executed;
4. non-finite observation / reward from the env → stop naming env and step, checkpoint kept;
5. non-finite numbers in the update → never applied, stop after N in a row, last good saved;
6. degenerate math (g = 0, sᵀHs ≤ 0, line search fails) → safe logged no-op;
7. bad configuration (every field) and an env raising in ``step``;
8. determinism (same seed → bit-identical metrics and parameters) and RNG restore on resume;
9. a batch that cannot fit in memory → refused with an estimate before any env exists.

Runs are tiny CartPole (or test-env) runs: 2 envs × 32 steps per update, an 8-unit MLP.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import shlex
import shutil
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

import natgrad.cg
import trpo.update
from trpo.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
)
from trpo.config import TRPOConfig, load_config, save_config
from trpo.logger import STEP_COLUMN, is_timing_key, read_metrics
from trpo.policy import make_actor
from trpo.train import TrainingError, train
from trpo.update import PolicyBatch, PolicyStepSettings, policy_step

# `trpo.train` is also the name of the function the package re-exports: get the module.
train_module = importlib.import_module("trpo.train")
ROOT = Path(__file__).resolve().parents[1]
N_ENVS, N_STEPS = 2, 32
BATCH = N_ENVS * N_STEPS
FAST = dict(
    n_envs=N_ENVS,
    n_steps=N_STEPS,
    hidden_sizes=(8,),
    cg_iters=3,
    critic_epochs=1,
    critic_minibatch_size=BATCH,
    line_search_max_tries=5,
    eval_episodes=0,
    plot=False,
    progress=False,
    tensorboard=False,
)
# The same settings as command-line flags (for the subprocess runs).
FAST_FLAGS = (
    f"--n-envs {N_ENVS} --n-steps {N_STEPS} --hidden-sizes 8 --cg-iters 3 --critic-epochs 1 "
    f"--critic-minibatch-size {BATCH} --line-search-max-tries 5 --eval-episodes 0 --no-plot "
    "--no-progress --no-tensorboard"
).split()


def make_config(tmp_path: Path, name: str, updates: int, **overrides) -> TRPOConfig:
    values = {**FAST, "total_steps": updates * BATCH, "runs_root": str(tmp_path), **overrides}
    return TRPOConfig(run_name=name, **values)


def resume_config(run_dir: Path, **overrides) -> TRPOConfig:
    """What ``python -m trpo.run --resume RUN_DIR [--flag value]`` builds."""
    return dataclasses.replace(load_config(run_dir), resume=str(run_dir), **overrides)


def assert_same(a, b, where="state"):
    """Exact recursive equality (tensors: dtype, shape and every bit of every value)."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        same = a == b
        if a.is_floating_point():
            same |= a.isnan() & b.isnan()
        assert bool(same.all()), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def training_state(path: Path) -> dict:
    """A checkpoint without its ``config`` entry (which names the run's own settings)."""
    state = load_checkpoint(path)
    state.pop("config")
    return state


def all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def learning_columns(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not is_timing_key(k)}


def assert_same_columns(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert [repr(x) for x in a[key]] == [repr(x) for x in b[key]], key


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def forbid_envs(monkeypatch):
    """Fail the test if train() gets as far as creating envs."""

    def make_envs(*args, **kwargs):
        raise AssertionError("train() created envs before refusing the run")

    monkeypatch.setattr(train_module, "make_envs", make_envs)


# --- a tiny env that misbehaves on request ------------------------------------------------------
class FaultyEnv(gym.Env):
    """A 2-D noisy walk, actions Discrete(2), episodes of ≤ 25 steps.

    Call ``fault_step`` (0-based, counted per env instance over all episodes) of ``step``
    returns a NaN observation (``"nan_obs"``), an inf reward (``"inf_reward"``) or raises
    (``"raise"``); ``fault=None`` never misbehaves. Up to the fault it is an ordinary
    seeded env, so a faulty and a clean run are identical until then.
    """

    def __init__(self, fault: str | None = None, fault_step: int = 0):
        self.observation_space = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.fault, self.fault_step, self.calls = fault, fault_step, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._x = self.np_random.normal(size=2).astype(np.float32)
        self._t = 0
        return self._x.copy(), {}

    def step(self, action):
        call, self.calls = self.calls, self.calls + 1
        self._t += 1
        push = 0.2 if int(action) == 1 else -0.2
        self._x = np.clip(self._x + push + 0.1 * self.np_random.normal(size=2), -9, 9).astype(
            np.float32
        )
        obs, reward = self._x.copy(), float(1.0 - abs(self._x[0]))
        if call == self.fault_step and self.fault is not None:
            if self.fault == "raise":
                raise RuntimeError("simulator exploded")
            if self.fault == "nan_obs":
                obs[1] = np.nan
            elif self.fault == "inf_reward":
                reward = math.inf
        return obs, reward, bool(abs(self._x[0]) > 3), self._t >= 25, {}


@pytest.fixture
def faulty_env():
    """Factory registering ``FaultyEnv`` with a fault under a fresh id; unregistered after."""
    ids: list[str] = []

    def register(fault: str | None, fault_step: int = 0) -> str:
        env_id = f"ReliabilityFaulty{len(ids)}{(fault or 'none').replace('_', '')}-v0"
        gym.register(
            env_id,
            entry_point=FaultyEnv,
            kwargs=dict(fault=fault, fault_step=fault_step),
            disable_env_checker=True,
        )
        ids.append(env_id)
        return env_id

    yield register
    for env_id in ids:
        gym.registry.pop(env_id, None)


# --- row 1: kill mid-run --------------------------------------------------------------------------
def test_sigkill_during_training_resumes_losing_at_most_one_interval(tmp_path):
    """A real SIGKILL from outside at an arbitrary moment of a run; then --resume."""
    every = 2
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trpo.run", *FAST_FLAGS, "--total-steps", str(1000 * BATCH)]
    cmd += ["--checkpoint-every", str(every), "--runs-root", str(tmp_path), "--run-name", "killed"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 180
        # Kill once a few checkpoints exist, while updates keep being written.
        while not any(u >= 3 * every for u, _ in list_checkpoints(run_dir)):
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        time.sleep(0.3)  # land somewhere inside a later update
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    completed = len(read_metrics(run_dir / "metrics.csv")[STEP_COLUMN])  # rows logged
    saved = load_latest_checkpoint(run_dir).update
    assert 0 <= completed - saved <= every, (completed, saved)  # at most one interval lost

    target = saved + 2
    resumed = subprocess.run(
        [sys.executable, "-m", "trpo.run", "--resume", str(run_dir)]
        + ["--total-steps", str(target * BATCH)],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"from {checkpoint_path(run_dir, saved).name}" in resumed.stdout.decode()
    steps = read_metrics(run_dir / "metrics.csv")[STEP_COLUMN]
    # Rows logged after the checkpoint and before the kill were dropped and redone.
    assert steps == [BATCH * (u + 1) for u in range(target)]
    final = load_latest_checkpoint(run_dir)
    assert final.update == target and final.state["global_step"] == target * BATCH


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    """SIGKILL (no cleanup runs) after checkpoint 4's bytes are on disk, before its rename."""
    run_dir = tmp_path / "run"
    flags = FAST_FLAGS + ["--total-steps", str(6 * BATCH), "--checkpoint-every", "2"]
    flags += ["--runs-root", str(tmp_path), "--run-name", "run"]
    script = textwrap.dedent(
        f"""
        import os, signal
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("ckpt_000004.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace
        from trpo.run import main
        main({flags!r})
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        timeout=180,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert any(n.startswith(".tmp_ckpt_000004.pt") for n in names)  # the half-done write
    assert [u for u, _ in list_checkpoints(run_dir)] == [2]  # never listed as a checkpoint
    assert len(read_metrics(run_dir / "metrics.csv")[STEP_COLUMN]) == 4

    result = train(resume_config(run_dir))  # the resume path of `--resume`, in process
    assert result.global_step == 6 * BATCH
    assert read_metrics(run_dir / "metrics.csv")[STEP_COLUMN] == [BATCH * u for u in range(1, 7)]
    assert [u for u, _ in list_checkpoints(run_dir)] == [6, 4, 2]
    left = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert not any(n.startswith(".tmp_") for n in left)  # the next save cleaned up


# --- rows 2 and 3: corrupted and untrusted checkpoints at resume ----------------------------------
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A finished 3-update run with a checkpoint after every update (copied per test)."""
    root = tmp_path_factory.mktemp("base")
    train(make_config(root, "base", 3, checkpoint_every=1, keep_checkpoints=10))
    return root / "base"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_record"])
def test_damaged_newest_checkpoint_is_named_and_resume_falls_back(
    tmp_path, three_checkpoints, damage, capsys
):
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    newest = checkpoint_path(run_dir, 3)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        newest.with_name(newest.name + ".sha256").unlink()
    good = training_state(checkpoint_path(run_dir, 2))

    resumed = []
    real_policy_step = train_module.policy_step

    def spy(actor, batch, **kwargs):  # the parameters the first resumed update starts from
        if not resumed:
            resumed.append(copy.deepcopy(actor.state_dict()))
        return real_policy_step(actor, batch, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "policy_step", spy)
        train(resume_config(run_dir, total_steps=4 * BATCH))
    out, err = capsys.readouterr()
    assert f"skipped checkpoint {newest}" in err
    reason = {"truncate": "truncated", "flip_byte": "SHA-256", "drop_record": "no checksum"}
    assert reason[damage] in err
    assert "from ckpt_000002.pt" in out
    assert_same(resumed[0], good["actor"])
    assert read_metrics(run_dir / "metrics.csv")[STEP_COLUMN] == [BATCH * u for u in range(1, 5)]


def test_no_valid_checkpoint_names_every_file(tmp_path, three_checkpoints):
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    for _, path in list_checkpoints(run_dir):
        path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="no valid checkpoint") as exc:
        train(resume_config(run_dir))
    for u in (1, 2, 3):
        assert f"checkpoint {checkpoint_path(run_dir, u)} is truncated" in str(exc.value)


class _Evil:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_crafted_checkpoint_in_a_run_dir_is_refused_at_resume(tmp_path, three_checkpoints, capsys):
    run_dir = copy_run(three_checkpoints, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = load_checkpoint(checkpoint_path(run_dir, 3))
    payload["actor"] = {**payload["actor"], "evil": _Evil(marker)}
    crafted = checkpoint_path(run_dir, 9)  # the newest, with a valid checksum record
    torch.save(payload, crafted)
    data = crafted.read_bytes()
    record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    crafted.with_name(crafted.name + ".sha256").write_text(json.dumps(record))
    torch.load(crafted, weights_only=False)  # control: the payload is live
    assert marker.exists()
    marker.unlink()

    train(resume_config(run_dir, total_steps=4 * BATCH))
    out, err = capsys.readouterr()
    assert not marker.exists()  # never executed
    assert f"skipped checkpoint {crafted}" in err and "weights_only" in err
    assert "from ckpt_000003.pt" in out

    # As the only checkpoint it is refused outright, still without running it.
    only = copy_run(run_dir, tmp_path / "only")
    for u, path in list_checkpoints(only):
        if u != 9:
            path.unlink()
    with pytest.raises(CheckpointError, match=r"ckpt_000009\.pt.*weights_only"):
        train(resume_config(only))
    assert not marker.exists()


# --- rows 4 and 7b: non-finite numbers from the env, an env raising --------------------------------
@pytest.mark.parametrize(
    ("fault", "what"),
    [
        ("nan_obs", "returned a non-finite observation"),
        ("inf_reward", "returned a non-finite reward"),
        ("raise", "raised during step"),
    ],
)
def test_env_fault_stops_naming_env_and_step_keeping_the_last_checkpoint(
    tmp_path, faulty_env, fault, what
):
    fault_step = 2 * N_STEPS + 6  # vector step 70: inside update index 2 (the third)
    # Reference: the same env without the fault, stopped after 2 updates.
    clean_id = faulty_env(None)
    train(make_config(tmp_path, "clean", 2, env_id=clean_id, normalize_obs=True))
    reference = training_state(checkpoint_path(tmp_path / "clean", 2))

    env_id = faulty_env(fault, fault_step)
    config = make_config(
        tmp_path, "faulty", 10, env_id=env_id, normalize_obs=True, checkpoint_every=100
    )
    with pytest.raises(TrainingError) as exc:
        train(config)
    message = str(exc.value)
    assert f"env {env_id!r} {what}" in message
    assert f"global step {fault_step * N_ENVS}" in message
    assert "--resume" in message
    # The checkpoint of the last completed update, exactly (RNG states included).
    assert [u for u, _ in list_checkpoints(tmp_path / "faulty")] == [2]
    assert_same(training_state(checkpoint_path(tmp_path / "faulty", 2)), reference)


# --- row 5: non-finite numbers in the update --------------------------------------------------------
BAD_FROM = 3  # the 3rd policy step (update index 2) is the first poisoned one


def _poison(monkeypatch, kind: str) -> None:
    calls = {"n": 0}

    def poisoned() -> bool:
        return calls["n"] >= BAD_FROM

    if kind in ("nan_fvp", "inf_fvp"):
        real = trpo.update.fisher_operator
        bad = math.nan if kind == "nan_fvp" else math.inf

        def fisher_operator(*args, **kwargs):
            calls["n"] += 1
            op = real(*args, **kwargs)
            return (lambda v: (op @ v) * bad) if poisoned() else op

        monkeypatch.setattr(trpo.update, "fisher_operator", fisher_operator)
    elif kind == "nan_cg":
        real_solve = natgrad.cg.CG.solve  # what natural_step calls

        def solve(self, *args, **kwargs):
            calls["n"] += 1
            result = real_solve(self, *args, **kwargs)
            if poisoned():
                result = dataclasses.replace(result, x=torch.full_like(result.x, math.nan))
            return result

        monkeypatch.setattr(natgrad.cg.CG, "solve", solve)
    elif kind == "nan_loss":
        real_gae = train_module.compute_gae

        def compute_gae(*args, **kwargs):
            calls["n"] += 1
            adv, ret = real_gae(*args, **kwargs)
            if poisoned():
                adv = adv.clone()
                adv[0, 0] = math.nan  # one NaN advantage makes the surrogate NaN
            return adv, ret

        monkeypatch.setattr(train_module, "compute_gae", compute_gae)
    elif kind == "nan_critic":  # policy step fine, critic regression blows up
        real_fit = train_module.fit_critic

        def fit_critic(critic, optimizer, obs, returns, **kwargs):
            calls["n"] += 1
            if poisoned():
                returns = returns * math.nan
            return real_fit(critic, optimizer, obs, returns, **kwargs)

        monkeypatch.setattr(train_module, "fit_critic", fit_critic)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan_loss", "nan_fvp", "inf_fvp", "nan_cg", "nan_critic"])
def test_nonfinite_update_is_never_applied_and_stops_after_n_in_a_row(
    tmp_path, monkeypatch, capsys, kind
):
    _poison(monkeypatch, kind)
    config = make_config(
        tmp_path,
        "run",
        10,
        checkpoint_every=1,
        keep_checkpoints=10,
        max_consecutive_failures=2,
    )
    with pytest.raises(TrainingError, match="2 consecutive updates were non-finite") as exc:
        train(config)
    run_dir = tmp_path / "run"
    assert str(checkpoint_path(run_dir, 4)) in str(exc.value)  # saved before stopping
    assert [u for u, _ in list_checkpoints(run_dir)] == [4, 3, 2, 1]

    last_good = training_state(checkpoint_path(run_dir, 2))
    for u in (3, 4):  # after each rejected update: parameters and Adam state unchanged
        state = training_state(checkpoint_path(run_dir, u))
        for key in ("actor", "critic", "critic_optimizer"):
            assert_same(state[key], last_good[key], f"ckpt {u} {key}")
        assert all_finite(state)
    assert all_finite(last_good)

    metrics = read_metrics(run_dir / "metrics.csv")  # every update logged, the failures too
    assert metrics["trpo/nonfinite_update"] == [0.0, 0.0, 1.0, 1.0]
    assert metrics["trpo/consecutive_failures"] == [0, 0, 1, 2]
    if kind != "nan_critic":  # (there the step was accepted, then undone with the critic's)
        assert metrics["trpo/line_search_success"][2:] == [0.0, 0.0]
    what = "critic fit" if kind == "nan_critic" else "policy step"
    assert capsys.readouterr().out.count(f"non-finite {what} rejected, parameters kept") == 2


def test_a_single_nonfinite_update_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    real = trpo.update.fisher_operator
    calls = {"n": 0}

    def fisher_operator(*args, **kwargs):
        calls["n"] += 1
        op = real(*args, **kwargs)
        return (lambda v: (op @ v) * math.nan) if calls["n"] == 2 else op

    monkeypatch.setattr(trpo.update, "fisher_operator", fisher_operator)
    result = train(make_config(tmp_path, "run", 4, max_consecutive_failures=2))
    assert result.metrics["trpo/nonfinite_update"] == [0.0, 1.0, 0.0, 0.0]
    assert result.metrics["trpo/consecutive_failures"] == [0, 1, 0, 0]
    assert all(bool(torch.isfinite(p).all()) for p in result.actor.parameters())


# --- row 6: degenerate math -------------------------------------------------------------------------
def _actor_and_batch(advantages: torch.Tensor | None = None):
    torch.manual_seed(0)
    obs_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    actor = make_actor(obs_space, gym.spaces.Discrete(3), (8,)).double()
    obs = torch.randn(64, 3, dtype=torch.float64)
    actions = torch.randint(0, 3, (64,))
    adv = torch.randn(64, dtype=torch.float64) if advantages is None else advantages
    return actor, PolicyBatch(obs=obs, actions=actions, advantages=adv)


STEP_FLOATS = (
    "kl",
    "surrogate_improvement",
    "expected_improvement",
    "step_fraction",
    "cg_residual",
    "grad_norm",
    "step_norm",
    "entropy",
)


@pytest.mark.parametrize("case", ["zero_advantages", "negative_curvature", "no_acceptable_point"])
def test_degenerate_policy_step_is_a_finite_no_op(monkeypatch, case):
    zeros = torch.zeros(64, dtype=torch.float64)
    actor, batch = _actor_and_batch(zeros if case == "zero_advantages" else None)
    kwargs = dict(max_kl=0.01, cg_iters=10, cg_damping=0.1)
    if case == "negative_curvature":  # sᵀ(H + λI)s ≤ 0: -(H + I) + 0.1 I
        real = trpo.update.fisher_operator

        def fisher_operator(*args, **kw):
            op = real(*args, **kw)
            return lambda v: -(op @ v) - v

        monkeypatch.setattr(trpo.update, "fisher_operator", fisher_operator)
    if case == "no_acceptable_point":  # demand 10⁶× the linear model's gain
        kwargs["line_search_accept_ratio"] = 1e6
    before = copy.deepcopy(actor.state_dict())
    result = policy_step(actor, batch, PolicyStepSettings(**kwargs))
    expected_status = {
        "zero_advantages": "ZERO_GRADIENT",
        "negative_curvature": "NON_POSITIVE_CURVATURE",
        "no_acceptable_point": "OK",
    }[case]
    assert result.status == expected_status
    assert not result.applied
    assert_same(actor.state_dict(), before)  # bit for bit
    for name in STEP_FLOATS:
        assert math.isfinite(getattr(result, name)), name
    assert result.kl == result.step_norm == result.step_fraction == 0.0
    if case == "no_acceptable_point":
        assert result.line_search_tries == 10 and result.expected_improvement > 0


@pytest.mark.parametrize("case", ["zero_advantages", "negative_curvature", "no_acceptable_point"])
def test_degenerate_updates_in_training_are_logged_no_ops(tmp_path, monkeypatch, capsys, case):
    overrides = {}
    real_gae, real_fisher = train_module.compute_gae, trpo.update.fisher_operator

    def zero_advantages(*args, **kwargs):
        advantages, returns = real_gae(*args, **kwargs)
        return torch.zeros_like(advantages), returns

    def negative_fisher(*args, **kwargs):
        op = real_fisher(*args, **kwargs)
        return lambda v: -(op @ v) - v

    if case == "zero_advantages":
        monkeypatch.setattr(train_module, "compute_gae", zero_advantages)
    elif case == "negative_curvature":
        monkeypatch.setattr(trpo.update, "fisher_operator", negative_fisher)
    else:
        overrides["line_search_accept_ratio"] = 1e6
    config = make_config(tmp_path, "run", 3, **overrides)
    result = train(config)
    # The actor never moved: it is still its seeded initialisation.
    torch.manual_seed(config.seed)
    initial = make_actor(
        gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2), (8,)
    )
    assert_same(result.actor.state_dict(), initial.state_dict())
    m = result.metrics
    assert m["trpo/line_search_success"] == [0.0] * 3
    assert m["trpo/step_norm"] == m["trpo/kl"] == [0.0] * 3
    assert m["trpo/nonfinite_update"] == [0.0] * 3  # degenerate is not a failure
    for key in ("trpo/expected_improvement", "trpo/grad_norm", "natgrad/cg_residual"):
        assert all(math.isfinite(x) for x in m[key]), key
    out = capsys.readouterr().out
    if case == "zero_advantages":
        assert out.count("g = 0: the zero step") == 3
        assert m["trpo/grad_norm"] == [0.0] * 3
    elif case == "negative_curvature":
        assert out.count("zero step: CG met pᵀ(H + λI)p ≤ 0") == 3


# --- row 7a: bad configuration, before any env exists -------------------------------------------
BAD_VALUES = {
    "env_id": "",
    "total_steps": 0,
    "seed": -1,
    "n_envs": 0,
    "n_steps": 1.5,
    "async_envs": "yes",
    "env_backend": "envpol",
    "env_threads": -1,
    "action_masks": "yes",
    "hidden_sizes": (64, 0),
    "policy": "lstm",
    "bptt_length": -1,
    "activation": "sigmoid",
    "log_std_init": math.nan,
    "actor_factory": "package.module.factory",
    "critic_factory": 3,
    "gamma": 0.0,
    "gae_lambda": 1.5,
    "normalize_advantages": 1,
    "max_kl": 0.0,
    "cg_iters": 0,
    "cg_damping": -1.0,
    "cg_rtol": -1.0,
    "fvp_fraction": 0.0,
    "line_search_shrink": 1.0,
    "line_search_max_tries": 0,
    "line_search_accept_ratio": -0.5,
    "critic_lr": 0.0,
    "critic_epochs": 0,
    "critic_minibatch_size": 0,
    "normalize_obs": None,
    "normalize_reward": "no",
    "obs_clip": 0.0,
    "reward_clip": -1.0,
    "eval_episodes": -1,
    "checkpoint_every": 0,
    "keep_checkpoints": 0,
    "log_every": 0,
    "runs_root": "",
    "run_name": "a/b",
    "resume": "",
    "tensorboard": 0,
    "plot": None,
    "progress": "x",
    "cuda_graph": "yes",
    "device": "gpu",
    "dtype": "float16",
    "torch_threads": -1,
    "max_consecutive_failures": 0,
    "memory_limit_gb": 0.0,
}


def test_every_config_field_has_an_invalid_value_tested():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(TRPOConfig)}


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_invalid_field_is_named_before_any_env_is_created(tmp_path, forbid_envs, field):
    # A config object cannot hold an invalid value (construction and replace() validate) ...
    with pytest.raises(ValueError, match=rf"^{field} must"):
        dataclasses.replace(TRPOConfig(), **{field: BAD_VALUES[field]})
    # ... so the way one reaches train() is a run directory's config.json, when resuming.
    run_dir = tmp_path / "run"
    save_config(TRPOConfig(), run_dir)
    values = json.loads((run_dir / "config.json").read_text())
    bad = BAD_VALUES[field]
    values[field] = list(bad) if isinstance(bad, tuple) else bad
    (run_dir / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=rf"config\.json: {field} must"):
        train(TRPOConfig(resume=str(run_dir)))


def test_unknown_env_id_is_refused_before_any_env_is_created(tmp_path, forbid_envs):
    with pytest.raises(ValueError, match="'CartPol-v1' is not a registered.*CartPole-v1"):
        train(make_config(tmp_path, "run", 1, env_id="CartPol-v1"))


# --- row 8: determinism -----------------------------------------------------------------------------
def test_same_seed_and_config_give_bit_identical_learning_metrics(tmp_path):
    kw = dict(normalize_obs=True, normalize_reward=True, fvp_fraction=0.5, critic_epochs=2)
    kw["critic_minibatch_size"] = 16
    a = train(make_config(tmp_path, "a", 3, **kw))
    b = train(make_config(tmp_path, "b", 3, **kw))
    c = train(make_config(tmp_path, "c", 3, seed=2, **kw))
    assert any(is_timing_key(k) for k in a.metrics)  # timing columns exist, and are excluded
    assert_same_columns(learning_columns(a.metrics), learning_columns(b.metrics))
    for key in ("trpo/kl", "trpo/value_loss", "charts/episode_return", "trpo/grad_norm"):
        assert key in a.metrics
    assert_same(a.actor.state_dict(), b.actor.state_dict())
    assert_same(a.critic.state_dict(), b.critic.state_dict())
    assert_same(a.obs_normalizer.state_dict(), b.obs_normalizer.state_dict())
    assert_same(
        training_state(checkpoint_path(a.run_dir, 3)), training_state(checkpoint_path(b.run_dir, 3))
    )
    # The comparison can fail: another seed gives other numbers.
    assert a.metrics["trpo/value_loss"] != c.metrics["trpo/value_loss"]


def test_resume_restores_the_rng_streams_and_statistics(tmp_path, monkeypatch):
    """The action-noise and minibatch generators continue exactly where the checkpoint was;
    so do the normalisers' statistics, while the running episodes (and their discounted
    returns in the reward scaler) start afresh."""
    seen: dict[str, list] = {"noise": [], "cpu": [], "obs_rms": [], "reward": []}
    real_rollout, real_step = train_module.collect_rollout, train_module.policy_step

    def collect_rollout(*args, generator, obs_normalizer, reward_scaler, **kwargs):
        seen["noise"].append(generator.get_state().clone())
        seen["obs_rms"].append(copy.deepcopy(obs_normalizer.state_dict()))
        seen["reward"].append(copy.deepcopy(reward_scaler.state_dict()))
        return real_rollout(
            *args,
            generator=generator,
            obs_normalizer=obs_normalizer,
            reward_scaler=reward_scaler,
            **kwargs,
        )

    def policy_step(*args, generator, **kwargs):
        seen["cpu"].append(generator.get_state().clone())
        return real_step(*args, generator=generator, **kwargs)

    monkeypatch.setattr(train_module, "collect_rollout", collect_rollout)
    monkeypatch.setattr(train_module, "policy_step", policy_step)
    kw = dict(fvp_fraction=0.5, normalize_obs=True, normalize_reward=True, checkpoint_every=2)
    full = train(make_config(tmp_path, "full", 4, **kw))
    uninterrupted = {k: v[:] for k, v in seen.items()}

    run_dir = tmp_path / "cut"  # the run as a kill after update 2 leaves it
    shutil.copytree(full.run_dir, run_dir)
    checkpoint_path(run_dir, 4).unlink()
    seen = {k: [] for k in seen}
    resumed = train(resume_config(run_dir))
    for stream in ("noise", "cpu"):
        assert len(seen[stream]) == 2
        assert torch.equal(seen[stream][0], uninterrupted[stream][2]), stream
    assert_same(seen["obs_rms"][0], uninterrupted["obs_rms"][2])
    before, after = uninterrupted["reward"][2], seen["reward"][0]
    assert before.pop("returns").count_nonzero() > 0  # episodes were running at the cut
    assert after.pop("returns").count_nonzero() == 0  # ... and start afresh
    assert_same(after, before)  # the return statistics are kept
    # What is the same: the rows before the checkpoint. What is not: the envs restart fresh
    # episodes, so the rollouts (and everything after) differ from the uninterrupted run.
    a, b = learning_columns(full.metrics), learning_columns(resumed.metrics)
    assert_same_columns({k: v[:2] for k, v in a.items()}, {k: v[:2] for k, v in b.items()})
    assert b[STEP_COLUMN] == a[STEP_COLUMN] == [BATCH * u for u in range(1, 5)]
    assert a["trpo/value_loss"][2:] != b["trpo/value_loss"][2:]


def test_a_resumed_run_is_itself_deterministic(tmp_path, three_checkpoints):
    """Resuming the same checkpoint twice gives bit-identical runs (fresh episodes included)."""
    runs = []
    for name in ("first", "second"):
        run_dir = copy_run(three_checkpoints, tmp_path / name)
        checkpoint_path(run_dir, 3).unlink()
        runs.append(train(resume_config(run_dir, total_steps=4 * BATCH)))
    a, b = (learning_columns(r.metrics) for r in runs)
    assert_same_columns(a, b)
    assert_same(runs[0].actor.state_dict(), runs[1].actor.state_dict())


# --- row 9: resource limits -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "budget"),
    [
        (dict(n_envs=8, n_steps=100_000, memory_limit_gb=0.01), "memory_limit_gb"),
        (dict(n_envs=4096, n_steps=2**30), "available host memory"),  # > any machine
    ],
)
def test_a_batch_that_cannot_fit_is_refused_with_an_estimate(
    tmp_path, forbid_envs, overrides, budget
):
    config = make_config(tmp_path, "run", 1, **overrides)
    with pytest.raises(ValueError, match=r"needs about [0-9.]+ GiB, more than") as exc:
        train(config)
    message = str(exc.value)
    assert budget in message and "n_envs × n_steps" in message and "lower n_envs" in message
    assert not (tmp_path / "run").exists()  # nothing written either
