"""Tests of trpo.run's parse_cli: presets as defaults, typed flags, --help, --resume layering.

The end-to-end CLI runs (artifacts, resume, run directories) are in tests/test_train.py.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from trpo.config import TRPOConfig, save_config
from trpo.presets import config_for
from trpo.run import parse_cli

FIELDS = [f.name for f in dataclasses.fields(TRPOConfig)]


def test_cli_without_arguments_is_the_cartpole_preset():
    assert parse_cli([]) == config_for("CartPole-v1")


@pytest.mark.parametrize(
    "argv",
    [
        ["--env", "Hopper-v5", "--cg-iters", "7"],
        ["--env-id", "Hopper-v5", "--cg-iters", "7"],
        ["--cg-iters", "7", "--env=Hopper-v5"],
        ["--cg_iters", "7", "--env_id", "Hopper-v5"],
        ["--env", "CartPole-v1", "--cg-iters", "7", "--env-id", "Hopper-v5"],  # last wins
    ],
)
def test_cli_typed_flags_override_the_preset_of_the_chosen_env(argv):
    assert parse_cli(argv) == config_for("Hopper-v5", cg_iters=7)


def test_cli_types_tuples_bools_optionals():
    cfg = parse_cli(
        [
            "--env",
            "Walker2d-v5",  # its preset normalises observations and rewards
            "--hidden-sizes",
            "32",
            "16",
            "--no-normalize-obs",
            "--run-name",
            "x1",
            "--memory-limit-gb",
            "2.5",
            "--dtype",
            "float64",
        ]
    )
    assert cfg.hidden_sizes == (32, 16)
    assert cfg.normalize_obs is False  # preset says True; the typed flag wins
    assert cfg.normalize_reward is True
    assert (cfg.run_name, cfg.memory_limit_gb, cfg.dtype) == ("x1", 2.5, "float64")


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--max-kl", "0"], "max_kl"),
        (["--gamma", "1.5"], "gamma"),
        (["--n-envs", "0"], "n_envs"),
        (["--gae-lambda", "2"], "gae_lambda"),
    ],
)
def test_cli_invalid_value_exits_naming_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(argv)
    assert exc.value.code == 2
    assert f"{field} must" in re.sub(r"[\s│]+", " ", capsys.readouterr().err)


def _help_blocks(argv, capsys, monkeypatch) -> dict[str, str]:
    """Flag → its help text, from ``--help`` rendered 250 columns wide."""
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exc:
        parse_cli([*argv, "--help"])
    assert exc.value.code == 0
    blocks: dict[str, str] = {}
    flags: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        text = line.strip("│ \t")
        if text.startswith("-"):  # a new option: "--a STR, --b STR   help..."
            flags = re.findall(r"--[\w-]+", text.split("  ")[0])
        for f in flags:
            blocks[f] = blocks.get(f, "") + " " + text
    return blocks


def test_help_lists_every_field_with_its_default(capsys, monkeypatch):
    blocks = _help_blocks([], capsys, monkeypatch)
    defaults = config_for("CartPole-v1")
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in blocks, f"{flag} missing from --help"
        value = getattr(defaults, name)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert f"(default: {shown})" in blocks[flag], f"{flag}: {blocks[flag]}"
    assert blocks["--env"] == blocks["--env-id"]  # one option with two names


def test_help_shows_the_preset_of_the_chosen_env(capsys, monkeypatch):
    assert (
        "(default: 25)" in _help_blocks(["--env", "Hopper-v5"], capsys, monkeypatch)["--cg-iters"]
    )
    default = config_for("CartPole-v1").cg_iters
    assert f"(default: {default})" in _help_blocks([], capsys, monkeypatch)["--cg-iters"]


def test_cli_resume_uses_the_saved_config_under_typed_flags(tmp_path):
    saved = config_for("Pendulum-v1", total_steps=4096, seed=7, run_name="pend")
    run_dir = tmp_path / "pend"
    save_config(saved, run_dir)
    cfg = parse_cli(["--resume", str(run_dir), "--total-steps", "8192"])
    assert cfg == dataclasses.replace(saved, total_steps=8192, resume=str(run_dir))
    assert cfg.run_dir == run_dir
    assert parse_cli(["--resume", str(run_dir), "--env", "Pendulum-v1"]).seed == 7


def test_cli_resume_errors(tmp_path, capsys):
    save_config(config_for("Pendulum-v1"), tmp_path / "r")
    with pytest.raises(SystemExit) as exc:
        parse_cli(["--resume", str(tmp_path / "r"), "--env", "CartPole-v1"])
    assert exc.value.code == 2 and "Pendulum-v1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_cli(["--resume", str(tmp_path / "missing")])
    assert "config.json" in capsys.readouterr().err


def test_cli_resume_gives_only_the_flags_that_change_the_saved_config(tmp_path):
    # --critic-epochs 10 equals the default but not the saved 5: it is given, and wins.
    saved = config_for("Pendulum-v1", critic_epochs=5, gae_lambda=0.9)
    save_config(saved, tmp_path / "p")
    cfg = parse_cli(["--resume", str(tmp_path / "p"), "--critic-epochs", "10"])
    assert cfg == dataclasses.replace(
        saved, critic_epochs=10, resume=str(tmp_path / "p"), run_name="p"
    )


def test_cli_resume_refuses_new_networks(tmp_path, capsys):
    save_config(config_for("Pendulum-v1"), tmp_path / "p")
    with pytest.raises(SystemExit) as exc:
        parse_cli(["--resume", str(tmp_path / "p"), "--hidden-sizes", "8"])
    assert exc.value.code == 2
    assert "hidden_sizes is (8,) but the run" in capsys.readouterr().err
