"""Tests for the training loop and its command lines: trpo.train, trpo.run, trpo.evaluate.

A learning test (seeded CartPole), a CLI smoke run that must write every artifact, resume
from a checkpoint through the CLI, ``weights_only`` checkpoints, ``--help`` / ``--env`` /
bad input, and ``python -m trpo.evaluate`` on a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from trpo.checkpoint import CHECKPOINT_DIRNAME, list_checkpoints, load_latest_checkpoint
from trpo.config import TRPOConfig, load_config
from trpo.evaluate import evaluate_policy, load_policy
from trpo.evaluate import main as evaluate_main
from trpo.logger import METRIC_KEYS, STEP_COLUMN, TENSORBOARD_DIRNAME, read_metrics
from trpo.presets import config_for
from trpo.run import main as run_main
from trpo.run import parse_cli
from trpo.train import train

REPO = Path(__file__).resolve().parents[1]

# A tiny CartPole run: 2 envs x 128 steps = 256 transitions per update, short critic fits.
N_ENVS, N_STEPS = 2, 128
BATCH = N_ENVS * N_STEPS
TINY = [
    "--env",
    "CartPole-v1",
    "--n-envs",
    str(N_ENVS),
    "--n-steps",
    str(N_STEPS),
    "--critic-epochs",
    "2",
    "--cg-iters",
    "5",
    "--no-progress",
    "--torch-threads",
    "1",
]

# Keys the training loop logs every update; their names are a stable interface.
STABLE_KEYS = (
    "charts/episode_return",
    "charts/episode_length",
    "charts/steps_per_second",
    "trpo/kl",
    "trpo/surrogate_improvement",
    "trpo/expected_improvement",
    "trpo/step_fraction",
    "trpo/line_search_success",
    "trpo/line_search_tries",
    "trpo/grad_norm",
    "trpo/entropy",
    "trpo/explained_variance",
    "trpo/value_loss",
    "natgrad/cg_iterations",
    "natgrad/cg_residual",
)


def _tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "200"  # keep tyro's help on one line per flag
    return env


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``trpo.run.main(argv)`` in this process: (return code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_main(argv)
        except SystemExit as e:  # the parser exits on bad flags
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # --torch-threads / torch_threads set a process-wide value: give it back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One finished CLI run of 4 updates (checkpoints every 2), shared by several tests."""
    root = tmp_path_factory.mktemp("runs")
    n = torch.get_num_threads()
    try:
        code, out, err = _run_cli(
            TINY
            + ["--total-steps", str(4 * BATCH), "--checkpoint-every", "2"]
            + ["--eval-episodes", "2", "--runs-root", str(root), "--run-name", "smoke"]
        )
    finally:
        torch.set_num_threads(n)
    assert code == 0, err
    return root / "smoke", out


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_cartpole_run_learns(tmp_path):
    # 24 updates of 1024 steps (the CartPole preset), 5-10 s on 2 cores. When this budget was
    # chosen, seeds 1, 2, 3 ended with last-3-update means of 236, 419, 198 and evaluation
    # means of 262, 499, 500 (seeds 5-8 passed too); seed 4 is a laggard (it peaks near 190
    # around update 17, then dips to about 140), so the test fixes seed 3.
    config = config_for(
        "CartPole-v1",
        total_steps=24 * 1024,
        seed=3,
        runs_root=str(tmp_path),
        run_name="learn",
        eval_episodes=10,
        torch_threads=1,
        progress=False,
        plot=False,
        tensorboard=False,
    )
    result = train(config)
    returns = [r for r in result.metrics["charts/episode_return"] if not math.isnan(r)]
    assert np.mean(returns[:2]) < 50  # a random policy: about 20
    recent = float(np.mean(returns[-3:]))
    assert max(recent, result.eval_mean) >= 150, (recent, result.eval_returns)
    assert result.global_step == 24 * 1024
    assert len(result.metrics[STEP_COLUMN]) == 24


# --------------------------------------------------------------------------------------------
# CLI smoke run: every artifact
# --------------------------------------------------------------------------------------------


def test_cli_smoke_run_writes_every_artifact(smoke_run):
    run_dir, out = smoke_run
    config = load_config(run_dir)
    assert (config.n_steps, config.total_steps, config.env_id) == (
        N_STEPS,
        4 * BATCH,
        "CartPole-v1",
    )

    metrics = read_metrics(run_dir / "metrics.csv")
    assert metrics[STEP_COLUMN] == [BATCH * (u + 1) for u in range(4)]
    for key in STABLE_KEYS:
        assert key in metrics, key
        assert key in METRIC_KEYS, f"{key} is logged but not documented in METRIC_KEYS"
    assert all(0 <= kl <= config.max_kl * (1 + 1e-5) for kl in metrics["trpo/kl"])
    assert all(it == 5 for it in metrics["natgrad/cg_iterations"])

    ckpts = sorted((run_dir / CHECKPOINT_DIRNAME).glob("ckpt_*.pt"))
    assert [p.name for p in ckpts] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    for p in ckpts:
        assert p.with_name(p.name + ".sha256").is_file()

    svg = ET.parse(run_dir / "learning_curve.svg").getroot()  # well-formed XML
    assert svg.tag.endswith("svg") and any(e.tag.endswith("polyline") for e in svg.iter())
    if _tensorboard_available():
        events = list((run_dir / TENSORBOARD_DIRNAME).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0
    assert "evaluation over 2 episodes: mean return" in out
    assert f"artifacts in {run_dir}" in out


def test_checkpoints_load_with_plain_weights_only_torch_load(smoke_run):
    run_dir, _ = smoke_run
    for update, path in list_checkpoints(run_dir):
        state = torch.load(path, weights_only=True)
        assert state["update"] == update
        assert state["global_step"] == update * BATCH
        assert isinstance(state["actor"]["layers.0.weight"], torch.Tensor)
        assert {"critic", "critic_optimizer", "rng"} <= set(state)


def test_evaluate_cli_on_a_finished_run(smoke_run, capsys):
    run_dir, _ = smoke_run
    proc = subprocess.run(
        [sys.executable, "-m", "trpo.evaluate", str(run_dir), "--episodes", "2"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CartPole-v1: mean return" in proc.stdout
    assert "over 2 episodes" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # `python -m` finds the module fresh

    # The printed mean is that of the newest checkpoint's deterministic policy.
    actor, obs_rms, env_id = load_policy(run_dir)
    state = load_latest_checkpoint(run_dir).state
    for name, p in actor.state_dict().items():
        assert torch.equal(p, state["actor"][name]), name
    returns = evaluate_policy(actor, env_id, episodes=2, obs_normalizer=obs_rms, seed=0)
    assert f"mean return {np.mean(returns):.1f}" in proc.stdout

    # --video: a GIF when the env can render, else a warning and the returns all the same.
    with pytest.warns(UserWarning) if _missing("pygame") else contextlib.nullcontext():
        assert evaluate_main([str(run_dir), "--episodes", "1", "--video"]) == 0
    printed = capsys.readouterr().out
    assert "mean return" in printed and "video:" in printed
    assert (run_dir / "eval.gif").exists() != _missing("pygame")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def test_resume_continues_from_the_saved_step(tmp_path):
    common = ["--runs-root", str(tmp_path), "--run-name", "r", "--eval-episodes", "0", "--no-plot"]
    common += ["--no-tensorboard", "--checkpoint-every", "2", "--keep-checkpoints", "10"]
    code, _, err = _run_cli(TINY + common + ["--total-steps", str(4 * BATCH)])
    assert code == 0, err
    run_dir = tmp_path / "r"
    per_update = math.ceil(BATCH / load_config(run_dir).critic_minibatch_size) * 2  # Adam steps

    # A run killed after update 4 but before its checkpoint: rows 3-4 exist, ckpt 4 does not.
    for suffix in ("", ".sha256"):
        (run_dir / CHECKPOINT_DIRNAME / f"ckpt_000004.pt{suffix}").unlink()
    code, out, err = _run_cli(["--resume", str(run_dir), "--total-steps", str(6 * BATCH)])
    assert code == 0, err
    assert f"from ckpt_000002.pt at step {2 * BATCH}" in out
    steps = read_metrics(run_dir / "metrics.csv")[STEP_COLUMN]
    # Rows after the checkpoint were dropped and redone; the first new row follows it.
    assert steps == [BATCH * (u + 1) for u in range(6)]
    final = load_latest_checkpoint(run_dir)
    assert (final.update, final.state["global_step"]) == (6, 6 * BATCH)
    # The critic's Adam continued from the checkpoint (a fresh one would count 4 updates).
    adam_steps = {float(s["step"]) for s in final.state["critic_optimizer"]["state"].values()}
    assert adam_steps == {6 * per_update}
    # The resumed run keeps its saved settings (e.g. n_steps) and takes the new total.
    assert (load_config(run_dir).n_steps, load_config(run_dir).total_steps) == (N_STEPS, 6 * BATCH)

    # Resume again from the final checkpoint of a finished run, for 2 more updates.
    code, out, err = _run_cli(["--resume", str(run_dir), "--total-steps", str(8 * BATCH)])
    assert code == 0, err
    assert f"from ckpt_000006.pt at step {6 * BATCH}" in out
    metrics = read_metrics(run_dir / "metrics.csv")
    steps = metrics[STEP_COLUMN]
    assert steps == sorted(set(steps)) == [BATCH * (u + 1) for u in range(8)]
    assert load_latest_checkpoint(run_dir).state["global_step"] == 8 * BATCH
    # Same columns before and after the resume, every row complete.
    assert all(not math.isnan(v) for v in metrics["trpo/kl"])

    # A resume that asks for fewer steps than done trains nothing and rewrites no checkpoint.
    ckpt_dir = run_dir / CHECKPOINT_DIRNAME
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    code, _, err = _run_cli(["--resume", str(run_dir), "--total-steps", str(4 * BATCH)])
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before
    assert read_metrics(run_dir / "metrics.csv")[STEP_COLUMN] == steps


# --------------------------------------------------------------------------------------------
# Command line: --help, --env, bad input
# --------------------------------------------------------------------------------------------


def test_help_lists_every_config_field_with_its_default():
    proc = subprocess.run(
        [sys.executable, "-m", "trpo.run", "--help"],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for field in dataclasses.fields(TRPOConfig):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
    assert re.search(r"--env\b(?!-)", text), "the --env alias is not listed"
    assert text.count("(default:") >= len(dataclasses.fields(TRPOConfig))
    assert "(default: CartPole-v1)" in text
    assert "(default: 100000)" in text  # total_steps


def test_env_alias_selects_the_env_and_its_preset():
    for argv in (["--env", "Pendulum-v1"], ["--env=Pendulum-v1"], ["--env-id", "Pendulum-v1"]):
        config = parse_cli(argv)
        assert config == config_for("Pendulum-v1"), argv
    assert parse_cli(["--env", "Pendulum-v1", "--n-envs", "3"]).n_envs == 3


def test_unknown_env_id_is_an_error_that_says_how_to_list_ids(tmp_path):
    code, out, err = _run_cli(["--env", "NoSuchEnv-v0", "--runs-root", str(tmp_path)])
    assert code == 2
    assert "NoSuchEnv-v0" in err and "pprint_registry" in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing created


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [("--max-kl", "-1", "max_kl"), ("--gamma", "1.5", "gamma"), ("--n-steps", "0", "n_steps")],
)
def test_invalid_config_value_is_an_error_naming_the_field(tmp_path, flag, value, field):
    code, _, err = _run_cli([flag, value, "--runs-root", str(tmp_path)])
    assert code == 2
    assert field in err
    assert not any(tmp_path.iterdir())


def test_library_resume_keeps_the_saved_hyperparameters(tmp_path):
    """train(TRPOConfig(resume=d, total_steps=...)) continues d with d's own config."""
    first = config_for(
        "CartPole-v1",
        total_steps=1024,
        n_envs=2,
        n_steps=256,
        critic_epochs=2,
        max_kl=0.02,
        seed=5,
        runs_root=str(tmp_path),
        run_name="lib",
        eval_episodes=0,
        progress=False,
        plot=False,
        tensorboard=False,
        checkpoint_every=1,
    )
    train(first)
    run_dir = tmp_path / "lib"
    resumed = train(TRPOConfig(resume=str(run_dir), total_steps=2048))
    assert resumed.global_step == 2048
    assert resumed.config.max_kl == 0.02 and resumed.config.n_steps == 256
    assert resumed.config.critic_epochs == 2 and resumed.config.seed == 5
    with pytest.raises(ValueError, match="env_id"):
        train(TRPOConfig(resume=str(run_dir), env_id="Pendulum-v1", total_steps=4096))


# --------------------------------------------------------------------------------------------
# Resume from Python: only the fields the caller gave override the saved config (issue 13.5)
# --------------------------------------------------------------------------------------------
QUICK = dict(
    n_steps=64,
    hidden_sizes=(8,),
    cg_iters=3,
    eval_episodes=0,
    progress=False,
    plot=False,
    tensorboard=False,
    checkpoint_every=1,
    torch_threads=1,
)


def _adam_steps(run_dir: Path) -> set[float]:
    state = load_latest_checkpoint(run_dir).state["critic_optimizer"]["state"]
    return {float(s["step"]) for s in state.values()}


@pytest.fixture
def pendulum_run(tmp_path):
    """A finished 1-update Pendulum run whose settings differ from the defaults and the preset
    (n_envs 2 with reward normalisation, cg_damping 0.05, gae_lambda 0.9, critic_epochs 5)."""
    first = config_for(
        "Pendulum-v1",
        total_steps=128,
        n_envs=2,
        cg_damping=0.05,
        gae_lambda=0.9,
        critic_epochs=5,
        critic_minibatch_size=64,
        runs_root=str(tmp_path),
        run_name="pend",
        **QUICK,
    )
    train(first)
    return tmp_path / "pend"


def test_library_resume_through_config_for_keeps_the_saved_hyperparameters(pendulum_run):
    resumed = train(config_for("Pendulum-v1", resume=str(pendulum_run), total_steps=256))
    config = resumed.config
    assert (config.cg_damping, config.gae_lambda, config.critic_epochs) == (0.05, 0.9, 5)
    assert (config.n_envs, config.total_steps, resumed.global_step) == (2, 256, 256)
    assert load_config(pendulum_run) == config  # config.json is not overwritten by the preset
    assert _adam_steps(pendulum_run) == {2 * 5 * 2}  # 2 updates × 5 epochs × 2 minibatches


def test_library_resume_honours_a_given_field_equal_to_its_default(pendulum_run):
    resumed = train(TRPOConfig(resume=str(pendulum_run), total_steps=256, critic_epochs=10))
    assert resumed.config.critic_epochs == 10 == TRPOConfig().critic_epochs
    assert resumed.config.gae_lambda == 0.9  # not given: the saved value
    assert _adam_steps(pendulum_run) == {5 * 2 + 10 * 2}


def test_library_resume_honours_a_new_critic_lr_and_n_envs(pendulum_run):
    # The critic optimiser's state_dict holds the old lr, and the reward scaler one running
    # return per env: both used to win over the config (or fail: "state['returns']...").
    resumed = train(
        TRPOConfig(resume=str(pendulum_run), total_steps=128 + 3 * 64, n_envs=3, critic_lr=5e-4)
    )
    assert resumed.global_step == 128 + 3 * 64
    final = load_latest_checkpoint(pendulum_run).state
    assert [g["lr"] for g in final["critic_optimizer"]["param_groups"]] == [5e-4]
    assert final["reward_scaler"]["returns"].shape == (3,)
    steps = read_metrics(pendulum_run / "metrics.csv")[STEP_COLUMN]
    assert steps == [128, 128 + 3 * 64]


def test_library_resume_refuses_other_networks_or_normalisation(pendulum_run):
    before = (pendulum_run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"^hidden_sizes is \(16,\) but the run in .* \(8,\)"):
        train(TRPOConfig(resume=str(pendulum_run), hidden_sizes=(16,)))
    with pytest.raises(ValueError, match="a resumed run keeps its normalize_reward"):
        train(config_for("Pendulum-v1", resume=str(pendulum_run), normalize_reward=False))
    assert (pendulum_run / "config.json").read_text() == before


# --------------------------------------------------------------------------------------------
# Run directories: exclusive, never reused by a new run, never outside runs_root (13.1-13.3)
# --------------------------------------------------------------------------------------------
def test_cli_refuses_to_reuse_a_run_name_for_a_new_run(tmp_path):
    common = [*TINY, "--runs-root", str(tmp_path), "--run-name", "same", "--eval-episodes", "0"]
    common += ["--no-plot", "--no-tensorboard", "--checkpoint-every", "1"]
    code, _, err = _run_cli([*common, "--seed", "1", "--total-steps", str(2 * BATCH)])
    assert code == 0, err
    run_dir = tmp_path / "same"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "trpo.run", *common, "--seed", "2", "--total-steps", str(BATCH)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: run directory {run_dir} already exists: continue that run with --resume "
        f"{run_dir} (resume= in Python), or choose a fresh --run-name"
    ]
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # run A is untouched: config, metrics, checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_a_taken_default_run_name_gets_a_suffix(tmp_path, monkeypatch):
    # Two runs of one env and seed started in the same second get the same default name.
    for module in ("trpo.config", "trpo.train"):
        monkeypatch.setattr(sys.modules[module], "default_run_name", lambda *a: "clash")
    config = config_for("CartPole-v1", total_steps=64, n_envs=1, runs_root=str(tmp_path), **QUICK)
    first, second = train(config), train(config)
    assert (first.run_dir, second.run_dir) == (tmp_path / "clash", tmp_path / "clash-2")
    for result in (first, second):
        assert result.metrics[STEP_COLUMN] == [64]
        assert load_config(result.run_dir).run_name == result.run_dir.name


def test_run_directories_are_created_exclusively_under_contention(tmp_path, monkeypatch):
    import threading

    train_module = sys.modules["trpo.train"]
    monkeypatch.setattr(train_module, "default_run_name", lambda env_id, seed: "clash")
    config = TRPOConfig(runs_root=str(tmp_path))
    names: list[str] = []
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        names.append(train_module._create_run_dir(config).run_name)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == sorted(["clash", *(f"clash-{k}" for k in range(2, 9))])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs"])
def test_run_names_that_leave_runs_root_are_rejected(tmp_path, name):
    root = tmp_path / "runs"
    root.mkdir()
    code, _, err = _run_cli([*TINY, "--runs-root", str(root), "--run-name", name])
    assert code == 2
    assert "run_name must be None or a directory name" in re.sub(r"[\s│]+", " ", err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"]  # nothing written anywhere


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_a_run_imports_none_of_the_slow_modules(tmp_path, env_id):
    # Each costs 0.4-2 s per process, a tenth of a whole CartPole run: torch._dynamo (any
    # torch.optim optimizer, torch.func's transforms), sympy (torch.broadcast_shapes) and
    # matplotlib (the learning curve is an SVG). A short run with every phase: critic fit,
    # policy step (categorical and Gaussian Fisher), checkpoint, plot, evaluation. In a fresh
    # interpreter: pytest's own imports differ.
    code = (
        "import sys\n"
        "from trpo import config_for, train\n"
        f"train(config_for({env_id!r}, total_steps=256, n_steps=128, eval_episodes=1,"
        f" progress=False, runs_root={str(tmp_path)!r}))\n"
        "slow = [m for m in ('torch._dynamo', 'sympy', 'matplotlib') if m in sys.modules]\n"
        "assert not slow, f'imported: {slow}'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob("*/learning_curve.svg"))
