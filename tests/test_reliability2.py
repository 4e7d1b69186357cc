"""Reliability, round 2 (issue 13): the items outside the training loop.

Each test is named after its item: symlinks (4, 7), ``module:`` ids read from a run
directory (8), never-ending evaluation episodes (9), special files named as checkpoints (10),
``module:Env-v0`` in ``make_envs`` (12), unwritable artifacts and ``ulimit -f`` (15),
incompatible checkpoints and damaged ``metrics.csv`` (16), ``trpo.evaluate`` errors (17) and
Dict/Tuple observations (19). Functions are called directly where that shows the behaviour;
a subprocess is used where the process boundary matters (exit codes, stderr, imports).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from trpo.checkpoint import (
    CheckpointError,
    check_state_shapes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_run_checkpoint,
)
from trpo.config import TRPOConfig, save_config
from trpo.envs import make_env, make_envs
from trpo.evaluate import main as evaluate_main
from trpo.evaluation import DEFAULT_MAX_EPISODE_STEPS, evaluate_policy, load_policy
from trpo.fileio import RunDirError, atomic_write_bytes, read_regular_file
from trpo.logger import MetricsFileError, MetricsLogger, plot_learning_curve, read_metrics
from trpo.policy import make_actor
from trpo.train import train

ROOT = Path(__file__).resolve().parents[1]


# --- test envs --------------------------------------------------------------------------------
class _Endless(gym.Env):
    """Reward 1 per step, never terminates; renders 4×4 rgb frames."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, False, {}

    def render(self):
        return np.full((4, 4, 3), 200, np.uint8)


class _NanAtStep3(_Endless):
    def reset(self, *, seed=None, options=None):
        self.t = 0
        return super().reset(seed=seed)

    def step(self, action):
        self.t += 1
        obs = np.full(2, np.nan if self.t == 3 else 0.0, np.float32)
        return obs, 1.0, False, False, {}


class _Nested(gym.Env):
    """Dict or Tuple observations (``kind``), episodes of 5 steps."""

    action_space = spaces.Discrete(2)

    def __init__(self, kind: str = "dict") -> None:
        parts = {"pos": spaces.Box(-1.0, 1.0, (3,), np.float32), "mode": spaces.Discrete(4)}
        self.observation_space = (
            spaces.Dict(parts) if kind == "dict" else spaces.Tuple(tuple(parts.values()))
        )
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), 1.0, self.t >= 5, False, {}


ENDLESS_ID, NESTED_ID = "trpo_test/Endless-v0", "trpo_test/Nested-v0"
NAN_ID = "trpo_test/NanAtStep3-v0"
if ENDLESS_ID not in gym.registry:
    gym.register(ENDLESS_ID, entry_point=_Endless)  # no max_episode_steps: never ends
    gym.register(NAN_ID, entry_point=_NanAtStep3)
    gym.register(NESTED_ID, entry_point=_Nested, max_episode_steps=50)


def _env_module(directory: Path, marker: Path | None = None) -> str:
    """Write a module registering ``Mod<hex>-v0`` (CartPole) that touches ``marker`` on
    import; return its ``module:Mod<hex>-v0`` id."""
    tag = uuid.uuid4().hex[:8]
    name = f"trpo_testmod_{tag}"
    touch = f"open({str(marker)!r}, 'w').close()" if marker is not None else ""
    (directory / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            import gymnasium
            {touch}
            gymnasium.register("Mod{tag}-v0", max_episode_steps=20,
                               entry_point="gymnasium.envs.classic_control:CartPoleEnv")
            """
        )
    )
    return f"{name}:Mod{tag}-v0"


def _run_dir_with_actor(tmp_path: Path, env_id: str, obs_dim: int = 4, **cfg) -> Path:
    """A run directory: config.json for ``env_id`` and one checkpoint of an 8-unit actor."""
    run_dir = tmp_path / "run"
    config = TRPOConfig(env_id=env_id, hidden_sizes=(8,), normalize_obs=False, **cfg)
    save_config(config, run_dir)
    actor = make_actor(spaces.Box(-1, 1, (obs_dim,)), spaces.Discrete(2), (8,))
    save_run_checkpoint(run_dir, 1, {"actor": actor.state_dict()})
    return run_dir


def _python(*args: str, env: dict | None = None, timeout: float = 120, **kw):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, **kw,
    )


def _finishes(fn, timeout: float = 30.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s (it hangs)"
    if "error" in result:
        raise result["error"]
    return result["value"]


# --- 4: symlinked checkpoints/ ------------------------------------------------------------------
def test_item4_symlinked_checkpoint_dir_is_refused_and_nothing_outside_is_deleted(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victims = {"ckpt_000001.pt": b"a", "ckpt_000001.pt.sha256": b"b", ".tmp_x": b"c"}
    for name, data in victims.items():
        (elsewhere / name).write_bytes(data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(elsewhere)
    state = {"w": torch.ones(3)}
    for call in (
        lambda: save_run_checkpoint(run_dir, 5, state, keep=1),
        lambda: prune_checkpoints(run_dir, keep=1),
        lambda: list_checkpoints(run_dir),
        lambda: load_latest_checkpoint(run_dir),
    ):
        with pytest.raises(CheckpointError, match="symbolic link"):
            call()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == victims


def test_item4_pruning_removes_links_not_their_targets(tmp_path):
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"keep me")
    run_dir = tmp_path / "run"
    for u in (2, 3):
        save_run_checkpoint(run_dir, u, {"u": u}, keep=5)
    ckdir = run_dir / "checkpoints"
    (ckdir / "ckpt_000001.pt").symlink_to(outside)  # oldest: pruned
    (ckdir / ".tmp_planted").symlink_to(outside)  # leftover temp: pruned
    deleted = prune_checkpoints(run_dir, keep=2)
    assert {p.name for p in deleted} == {"ckpt_000001.pt", ".tmp_planted"}
    assert outside.read_bytes() == b"keep me"
    assert sorted(p.name for p in ckdir.iterdir() if not p.name.endswith(".sha256")) == [
        "ckpt_000002.pt",
        "ckpt_000003.pt",
    ]


# --- 7: artifacts replace links, never write through them ---------------------------------------
def _planted_link(tmp_path: Path, link: Path) -> Path:
    target = tmp_path / "victim.txt"
    target.write_bytes(b"original")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return target


def test_item7_learning_curve_replaces_a_link_and_leaves_its_target(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        logger.log(10, {"charts/episode_return": 1.0})
    for name, magic in (("learning_curve.svg", b"<svg"), ("curve.png", b"\x89PNG\r\n\x1a\n")):
        chart = run_dir / name
        (tmp_path / name).mkdir()  # each chart's own victim
        target = _planted_link(tmp_path / name, chart)
        plot_learning_curve(run_dir / "metrics.csv", chart)
        assert target.read_bytes() == b"original"
        assert not chart.is_symlink() and chart.read_bytes()[: len(magic)] == magic


def test_item7_eval_gif_replaces_a_link_and_leaves_its_target(tmp_path):
    gif = tmp_path / "run" / "eval.gif"
    target = _planted_link(tmp_path, gif)
    actor = make_actor(spaces.Box(-1, 1, (2,)), spaces.Discrete(2), (8,))
    with pytest.warns(UserWarning, match="did not end within 5 steps"):
        evaluate_policy(actor, ENDLESS_ID, episodes=1, video_path=gif, max_episode_steps=5)
    assert target.read_bytes() == b"original"
    assert not gif.is_symlink() and gif.read_bytes()[:6] == b"GIF89a"


def test_item7_checkpoint_and_metrics_never_write_through_links(tmp_path):
    run_dir = tmp_path / "run"
    path = checkpoint_path(run_dir, 1)
    ckpt_target = _planted_link(tmp_path, path)
    save_checkpoint(path, {"w": torch.zeros(2)})
    assert ckpt_target.read_bytes() == b"original" and not path.is_symlink()
    csv_target = tmp_path / "csv_victim.txt"
    csv_target.write_bytes(b"original")
    (run_dir / "metrics.csv").symlink_to(csv_target)
    with pytest.raises(MetricsFileError, match="symbolic link"):
        MetricsLogger(run_dir, tensorboard=False)
    assert csv_target.read_bytes() == b"original"
    (run_dir / "metrics.csv").unlink()
    (run_dir / "tensorboard").symlink_to(tmp_path)
    with pytest.raises(MetricsFileError, match="TensorBoard directory .* symbolic link"):
        MetricsLogger(run_dir, tensorboard=True)


def test_item7_atomic_write_leaves_no_temporary_file_on_failure(tmp_path):
    with pytest.raises(RunDirError, match="directory"):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"1")
    (tmp_path / "d").mkdir()
    with pytest.raises(RunDirError):  # a directory in the way of the rename
        atomic_write_bytes(tmp_path / "d", b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_item7_artifacts_get_the_umask_mode_not_0600(tmp_path):
    umask = os.umask(0o027)
    os.umask(umask)
    path = atomic_write_bytes(tmp_path / "a.bin", b"1")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- 8: module: ids read from a run directory ----------------------------------------------------
def test_item8_evaluate_refuses_to_import_a_run_dirs_module_without_opt_in(tmp_path):
    marker = tmp_path / "imported"
    env_id = _env_module(tmp_path, marker)
    run_dir = _run_dir_with_actor(tmp_path, env_id)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    refused = _python("-m", "trpo.evaluate", str(run_dir), "--episodes", "1", env=env)
    assert refused.returncode == 2
    assert "--allow-import" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    allowed = _python(
        "-m", "trpo.evaluate", str(run_dir), "--episodes", "1", "--allow-import", env=env
    )
    assert allowed.returncode == 0, allowed.stderr
    assert marker.exists() and "mean return" in allowed.stdout


def test_item8_load_policy_refuses_module_ids_unless_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    env_id = _env_module(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = _run_dir_with_actor(tmp_path, env_id)
    with pytest.raises(ValueError, match="allow_import=True"):
        load_policy(run_dir)
    assert not marker.exists()
    actor, _, loaded_id = load_policy(run_dir, allow_import=True)
    assert marker.exists() and env_id == loaded_id


# --- 9: never-ending evaluation episodes ----------------------------------------------------------
def test_item9_evaluation_caps_endless_episodes_with_a_warning():
    actor = make_actor(spaces.Box(-1, 1, (2,)), spaces.Discrete(2), (8,))
    with pytest.warns(UserWarning, match="did not end within 37 steps"):
        returns = _finishes(lambda: evaluate_policy(actor, ENDLESS_ID, episodes=2,
                                                    max_episode_steps=37))
    assert returns == [37.0, 37.0]  # reward 1 per step: exactly the cap
    with pytest.warns(UserWarning, match=f"within {DEFAULT_MAX_EPISODE_STEPS} steps"):
        returns = _finishes(lambda: evaluate_policy(actor, ENDLESS_ID, episodes=1))
    assert returns == [float(DEFAULT_MAX_EPISODE_STEPS)]


def test_item9_train_final_evaluation_on_an_endless_env_returns(tmp_path):
    config = TRPOConfig(
        env_id=ENDLESS_ID, n_envs=2, n_steps=16, total_steps=32, hidden_sizes=(8,),
        cg_iters=3, critic_epochs=1, critic_minibatch_size=32, eval_episodes=1, plot=False,
        progress=False, tensorboard=False, runs_root=str(tmp_path), run_name="endless",
    )
    with pytest.warns(UserWarning, match=f"within {DEFAULT_MAX_EPISODE_STEPS} steps"):
        result = _finishes(lambda: train(config), timeout=120)
    assert result.eval_returns == [float(DEFAULT_MAX_EPISODE_STEPS)]


def test_item9_an_env_with_its_own_limit_is_not_capped_or_warned(recwarn):
    actor = make_actor(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), (8,))
    returns = evaluate_policy(actor, "CartPole-v1", episodes=1, max_episode_steps=10_000)
    assert 1 <= returns[0] <= 500  # CartPole's own TimeLimit (500) or a fall ended it
    assert not [w for w in recwarn if "did not end" in str(w.message)]


def test_item9_library_import_does_not_import_the_cli_module():
    code = (
        "import sys, trpo, trpo.evaluation, trpo.train; "
        "assert 'trpo.evaluate' not in sys.modules, 'import trpo imported trpo.evaluate'"
    )
    assert _python("-c", code).returncode == 0
    done = _python("-W", "error::RuntimeWarning", "-m", "trpo.evaluate", "--help")
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr


# --- 10: FIFOs, devices and oversized files named as checkpoints ------------------------------
def _two_checkpoints(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    save_run_checkpoint(run_dir, 1, {"update": 1})
    save_run_checkpoint(run_dir, 2, {"update": 2})
    return run_dir


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_item10_a_fifo_as_newest_checkpoint_is_skipped_without_blocking(tmp_path):
    run_dir = _two_checkpoints(tmp_path)
    newest = checkpoint_path(run_dir, 2)
    newest.unlink()
    os.mkfifo(newest)  # its record is still there: it claims to be a real checkpoint
    loaded = _finishes(lambda: load_latest_checkpoint(run_dir))
    assert loaded.update == 1 and loaded.state == {"update": 1}
    assert loaded.skipped[0][0] == newest and "FIFO" in loaded.skipped[0][1]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_item10_a_fifo_as_config_json_does_not_block_evaluate(tmp_path, capsys):
    run_dir = _run_dir_with_actor(tmp_path, "CartPole-v1")
    (run_dir / "config.json").unlink()
    os.mkfifo(run_dir / "config.json")
    assert _finishes(lambda: evaluate_main([str(run_dir)])) == 2
    assert "is a FIFO, not a regular file" in capsys.readouterr().err


def test_item10_links_and_devices_are_never_read(tmp_path):
    run_dir = _two_checkpoints(tmp_path)
    newest = checkpoint_path(run_dir, 2)
    newest.unlink()
    newest.symlink_to("/dev/zero")
    loaded = _finishes(lambda: load_latest_checkpoint(run_dir))
    assert loaded.update == 1 and "symbolic link" in loaded.skipped[0][1]
    with pytest.raises(CheckpointError, match="device"):
        _finishes(lambda: load_checkpoint("/dev/zero", verify=False))


def test_item10_a_file_larger_than_its_record_is_refused_before_reading(tmp_path):
    run_dir = _two_checkpoints(tmp_path)
    newest = checkpoint_path(run_dir, 2)
    os.truncate(newest, 1 << 40)  # a sparse 1 TiB file: reading it would never end
    loaded = _finishes(lambda: load_latest_checkpoint(run_dir))
    assert loaded.update == 1 and "larger than" in loaded.skipped[0][1]
    with pytest.raises(RunDirError, match="more than the 10"):
        read_regular_file(newest, max_bytes=10)


# --- 12: module:Env-v0 ids in training --------------------------------------------------------
def test_item12_make_envs_accepts_module_ids_and_names_a_failing_import(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = _env_module(tmp_path)
    envs = make_envs(env_id, 2)
    try:
        assert envs.num_envs == 2 and envs.single_observation_space.shape == (4,)
    finally:
        envs.close()
    with pytest.raises(ValueError, match="importing module 'no_such_mod_xyz' failed"):
        make_envs("no_such_mod_xyz:Mod-v0", 1)
    with pytest.raises(ValueError, match="unknown env_id"):
        make_envs(env_id.split(":")[0] + ":Other-v0", 1)


# --- 15: unwritable artifacts and the file-size limit ------------------------------------------
def test_item15_file_size_limit_at_a_checkpoint_is_one_error_without_leftovers(tmp_path):
    run_dir = tmp_path / "run"
    save_run_checkpoint(run_dir, 1, {"w": torch.zeros(4)})
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python: EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
    try:
        with pytest.raises(CheckpointError, match="ulimit -f") as info:
            save_run_checkpoint(run_dir, 2, {"w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(checkpoint_path(run_dir, 2)) in str(info.value)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert load_latest_checkpoint(run_dir).update == 1


def test_item15_unwritable_run_dir_and_metrics_csv_are_typed_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_run_checkpoint(blocker / "run", 1, {"w": torch.zeros(1)})
    with pytest.raises(MetricsFileError, match="not a directory"):
        MetricsLogger(blocker / "run", tensorboard=False)
    run_dir = tmp_path / "run"
    (run_dir / "metrics.csv").mkdir(parents=True)
    with pytest.raises(MetricsFileError, match="metrics.csv"):
        MetricsLogger(run_dir, tensorboard=False)
    assert [p.name for p in blocker.parent.iterdir() if p.name.startswith(".tmp_")] == []


# --- 16: incompatible checkpoints, damaged metrics.csv ------------------------------------------
def test_item16_another_envs_newer_checkpoint_is_passed_over_by_validate(tmp_path):
    run_dir = tmp_path / "run"
    mine = make_actor(spaces.Box(-1, 1, (4,)), spaces.Discrete(2), (8,))
    other = make_actor(spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (1,)), (8,))
    save_run_checkpoint(run_dir, 1, {"actor": mine.state_dict()})
    save_run_checkpoint(run_dir, 2, {"actor": other.state_dict()})
    loaded = load_latest_checkpoint(run_dir, validate=lambda s: check_state_shapes(s, actor=mine))
    assert loaded.update == 1
    (path, reason), = loaded.skipped
    assert path == checkpoint_path(run_dir, 2) and "does not fit" in reason
    torch.testing.assert_close(loaded.state["actor"], mine.state_dict(), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="other parameters"):
        check_state_shapes({"actor": other.state_dict()}, actor=mine)
    narrower = make_actor(spaces.Box(-1, 1, (3,)), spaces.Discrete(2), (8,))
    with pytest.raises(CheckpointError, match=r"shape \(8, 3\), this actor needs \(8, 4\)"):
        check_state_shapes({"actor": narrower.state_dict()}, actor=mine)
    with pytest.raises(CheckpointError, match="no 'critic'"):
        check_state_shapes({"actor": mine.state_dict()}, actor=mine, critic=mine)


def test_item16_damaged_metrics_rows_are_dropped_with_a_warning_and_kept(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in (10, 20, 30, 40):
            logger.log(step, {"a": step / 10})
    csv_path = run_dir / "metrics.csv"
    lines = csv_path.read_bytes().split(b"\n")  # header, 4 rows, ""
    lines[2] = b"\xff\xfe\x00garbage"  # row of step 20: not UTF-8
    lines[3] = b"30,1.0,extra"  # row of step 30: mangled (too wide)
    damaged = b"\n".join(lines)
    csv_path.write_bytes(damaged)
    with MetricsLogger(run_dir, tensorboard=False, resume_step=40) as logger:
        logger.log(50, {"a": 5.0})
    err = capsys.readouterr().err
    assert "dropped 2 unreadable row(s) (line 3, 4)" in err
    assert read_metrics(csv_path) == {"global_step": [10, 40, 50], "a": [1.0, 4.0, 5.0]}
    assert (run_dir / "metrics.csv.damaged").read_bytes() == damaged


# --- 17: trpo.evaluate errors ------------------------------------------------------------------
def _one_line_error(argv: list[str], capsys) -> str:
    try:
        code = evaluate_main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_item17_every_evaluate_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert "not a directory" in _one_line_error([str(tmp_path / "nope")], capsys)
    assert "config.json" in _one_line_error([str(tmp_path)], capsys)
    run_dir = _run_dir_with_actor(tmp_path, "CartPole-v1")
    assert ">= 1" in _one_line_error([str(run_dir), "--episodes", "0"], capsys)
    assert "unrecognized" in _one_line_error([str(run_dir), "--bogus"], capsys)
    for p in (run_dir / "checkpoints").iterdir():
        p.unlink()
    assert "no checkpoint" in _one_line_error([str(run_dir)], capsys)
    other = make_actor(spaces.Box(-1, 1, (3,)), spaces.Discrete(2), (8,))
    save_run_checkpoint(run_dir, 1, {"actor": other.state_dict()})  # another env's
    assert "does not fit" in _one_line_error([str(run_dir)], capsys)


def test_item17_a_negative_seed_and_a_nan_env_are_named_not_tracebacks(tmp_path, capsys):
    run_dir = _run_dir_with_actor(tmp_path, "CartPole-v1")
    assert ">= 0" in _one_line_error([str(run_dir), "--seed", "-1"], capsys)
    actor = make_actor(spaces.Box(-1, 1, (2,)), spaces.Discrete(2), (8,))
    with pytest.raises(ValueError, match="non-finite observation or reward at step 3 of "
                                         "evaluation episode 0"):
        evaluate_policy(actor, NAN_ID, episodes=1)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        evaluate_policy(actor, NAN_ID, seed=-2)


def test_item17_skipped_newer_checkpoints_are_named_on_stderr(tmp_path, capsys):
    run_dir = _run_dir_with_actor(tmp_path, "CartPole-v1")
    save_run_checkpoint(run_dir, 2, {"actor": {}})
    bad = checkpoint_path(run_dir, 3)
    save_run_checkpoint(run_dir, 3, {"actor": {}})
    bad.write_bytes(b"corrupted")
    assert evaluate_main([str(run_dir), "--episodes", "1"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped checkpoint {bad}: " in err and "truncated or corrupted" in err
    assert f"warning: skipped checkpoint {checkpoint_path(run_dir, 2)}: " in err


# --- 19: Dict/Tuple observations ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_item19_nested_observations_are_flattened_with_a_notice(kind, capsys):
    reference = gym.wrappers.FlattenObservation(_Nested(kind))
    envs = make_envs(NESTED_ID, 2, env_kwargs={"kind": kind})
    try:
        assert envs.single_observation_space == reference.observation_space
        obs, _ = envs.reset(seed=[3, 4])
        expected, _ = reference.reset(seed=3)
        np.testing.assert_array_equal(obs[0], expected)
    finally:
        envs.close()
    notice = "flattened with gymnasium.wrappers.FlattenObservation into 7 features"
    assert capsys.readouterr().err.count(notice) == 1  # one line for the N envs
    env = make_env(NESTED_ID, env_kwargs={"kind": kind})
    assert env.observation_space == reference.observation_space
    assert capsys.readouterr().err.count(notice) == 1


def test_item19_a_policy_on_a_dict_env_evaluates():
    actor = make_actor(spaces.Box(-1, 1, (7,)), spaces.Discrete(2), (8,))
    assert evaluate_policy(actor, NESTED_ID, episodes=2) == [5.0, 5.0]

