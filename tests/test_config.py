"""Tests of trpo.config: validation, presets, CLI layering, JSON round trip, memory budget."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re

import pytest

from trpo.config import (
    PRESETS,
    MemoryBudgetError,
    TRPOConfig,
    available_memory_bytes,
    check_env_id,
    check_memory,
    config_for,
    default_run_name,
    estimate_rollout_bytes,
    load_config,
    parse_cli,
    save_config,
)

FIELDS = [f.name for f in dataclasses.fields(TRPOConfig)]
MUJOCO = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")


# --- validation -------------------------------------------------------------------------------
INVALID = [
    ("max_kl", 0.0),
    ("max_kl", -0.01),
    ("max_kl", math.nan),
    ("max_kl", math.inf),
    ("gamma", 0.0),
    ("gamma", 1.0001),
    ("gamma", -0.5),
    ("gae_lambda", -0.1),
    ("gae_lambda", 1.1),
    ("total_steps", 0),
    ("n_envs", 0),
    ("n_envs", 2.5),
    ("n_envs", True),
    ("n_steps", -1),
    ("cg_iters", 0),
    ("cg_damping", -1e-3),
    ("cg_rtol", -1.0),
    ("fvp_fraction", 0.0),
    ("fvp_fraction", 1.5),
    ("line_search_shrink", 0.0),
    ("line_search_shrink", 1.0),
    ("line_search_max_tries", 0),
    ("line_search_accept_ratio", -0.1),
    ("critic_lr", 0.0),
    ("critic_epochs", 0),
    ("critic_minibatch_size", 0),
    ("obs_clip", 0.0),
    ("reward_clip", -1.0),
    ("checkpoint_every", 0),
    ("keep_checkpoints", 0),
    ("log_every", 0),
    ("max_consecutive_failures", 0),
    ("seed", -1),
    ("eval_episodes", -1),
    ("torch_threads", -2),
    ("hidden_sizes", (64, 0)),
    ("hidden_sizes", [64, 64]),
    ("device", "gpu"),
    ("device", "cuda:x"),
    ("dtype", "float16"),
    ("env_id", ""),
    ("run_name", "a/b"),
    ("run_name", ""),
    ("memory_limit_gb", 0.0),
    ("normalize_obs", "yes"),
    ("log_std_init", math.nan),
    ("runs_root", ""),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        TRPOConfig(**{field: value})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(gamma=1.0),
        dict(gae_lambda=0.0),
        dict(gae_lambda=1.0),
        dict(cg_damping=0.0),
        dict(fvp_fraction=1.0),
        dict(device="cuda:1"),
        dict(device="auto"),
        dict(hidden_sizes=()),
        dict(max_kl=1),
        dict(dtype="float64"),
        dict(seed=0),
    ],
)
def test_boundary_values_are_valid(overrides):
    cfg = TRPOConfig(**overrides)
    for k, v in overrides.items():
        assert getattr(cfg, k) == v


def test_every_field_named_in_its_error_is_really_a_field():
    assert {f for f, _ in INVALID} <= set(FIELDS)


def test_config_is_frozen_and_replace_revalidates():
    cfg = TRPOConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_kl = 0.02  # type: ignore[misc]
    assert dataclasses.replace(cfg, max_kl=0.02).max_kl == 0.02
    with pytest.raises(ValueError, match="^gamma must"):
        dataclasses.replace(cfg, gamma=2.0)


def test_derived_sizes():
    cfg = TRPOConfig(n_envs=2, n_steps=512, total_steps=100_000)
    assert cfg.batch_size == 1024
    assert cfg.num_updates == 98  # ceil(100000 / 1024)
    assert TRPOConfig(n_envs=1, n_steps=10, total_steps=30).num_updates == 3


def test_torch_dtype_and_device():
    import torch

    assert TRPOConfig(dtype="float64").torch_dtype() is torch.float64
    assert TRPOConfig().torch_device() == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TRPOConfig(device="auto").torch_device().type == expected


# --- presets ------------------------------------------------------------------------------------
def test_presets_cover_the_issue_envs_and_only_name_fields():
    assert set(PRESETS) >= {"CartPole-v1", "Pendulum-v1", *MUJOCO}
    for env_id, preset in PRESETS.items():
        assert set(preset) <= set(FIELDS), env_id
        cfg = config_for(env_id)
        for k, v in preset.items():
            assert getattr(cfg, k) == v


@pytest.mark.parametrize("env_id", MUJOCO)
def test_mujoco_presets_match_the_issue(env_id):
    cfg = config_for(env_id)
    assert (cfg.n_envs, cfg.n_steps, cfg.cg_iters, cfg.cg_damping) == (2, 1024, 25, 0.1)
    assert (cfg.critic_epochs, cfg.critic_lr, cfg.gae_lambda) == (20, 1e-3, 0.95)
    assert cfg.normalize_obs and cfg.total_steps == 1_000_000
    assert cfg.max_kl == (0.04 if env_id == "HalfCheetah-v5" else 0.01)


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        PRESETS["CartPole-v1"]["max_kl"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["Foo-v0"] = {}  # type: ignore[index]


def test_config_for_layers_defaults_preset_overrides():
    cfg = config_for("Hopper-v5", cg_iters=7, seed=3)
    assert cfg.env_id == "Hopper-v5"
    assert cfg.cg_iters == 7 and cfg.seed == 3  # override beats preset and default
    assert cfg.n_steps == 1024  # preset beats default
    assert cfg.line_search_shrink == TRPOConfig().line_search_shrink  # default kept
    other = config_for("MountainCar-v0")  # no preset: the dataclass defaults
    assert dataclasses.replace(other, env_id="CartPole-v1") == TRPOConfig()
    with pytest.raises(ValueError, match="unknown TRPOConfig field.*max_kll"):
        config_for("Hopper-v5", max_kll=0.1)
    with pytest.raises(ValueError, match="^max_kl must"):
        config_for("Hopper-v5", max_kl=-1.0)


# --- CLI ----------------------------------------------------------------------------------------
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
            "Hopper-v5",
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


# --- persistence and run names -----------------------------------------------------------------
def test_dict_and_json_round_trip_keeps_tuples():
    cfg = config_for("Walker2d-v5", hidden_sizes=(256, 128, 8), memory_limit_gb=3.0, run_name="w")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["hidden_sizes"] == [256, 128, 8]
    back = TRPOConfig.from_dict(data)
    assert back == cfg and isinstance(back.hidden_sizes, tuple)
    assert TRPOConfig.from_dict({"max_kl": 0.05}) == TRPOConfig(max_kl=0.05)
    with pytest.raises(ValueError, match="unknown TRPOConfig field.*bogus"):
        TRPOConfig.from_dict({**data, "bogus": 1})
    assert TRPOConfig.from_dict({**data, "bogus": 1}, strict=False) == cfg
    with pytest.raises(ValueError, match="^gamma must"):
        TRPOConfig.from_dict({**data, "gamma": 0})


def test_save_and_load_config(tmp_path):
    cfg = config_for("HalfCheetah-v5", seed=4)
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.json" and json.loads(path.read_text())["seed"] == 4
    assert load_config(tmp_path / "run") == cfg
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "run")
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "nowhere")


def test_run_name_and_run_dir(tmp_path):
    now = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert default_run_name("ALE/Pong-v5", 3, now) == "ALE_Pong-v5__3__20240102-030405"
    cfg = TRPOConfig(runs_root=str(tmp_path))
    with pytest.raises(ValueError, match="resolved"):
        _ = cfg.run_dir
    named = cfg.resolved(now)
    assert named.run_name == "CartPole-v1__1__20240102-030405"
    assert named.resolved() is named
    assert named.run_dir == tmp_path / named.run_name
    resumed = TRPOConfig(resume=str(tmp_path / "old"))
    assert resumed.run_dir == tmp_path / "old" and resumed.resolved().run_name == "old"


def test_check_env_id():
    check_env_id("CartPole-v1")
    check_env_id("some.module:MyEnv-v0")  # imported by gymnasium.make, not checked here
    with pytest.raises(ValueError, match=r"'CartPol-v1'.*'CartPole-v1'.*pprint_registry"):
        check_env_id("CartPol-v1")


# --- memory budget ------------------------------------------------------------------------------
def test_estimate_rollout_bytes_by_hand():
    cfg = TRPOConfig(n_envs=2, n_steps=10, hidden_sizes=(3,), dtype="float64", fvp_fraction=0.5)
    # B = 20, B_f = 10, b = 8, W_a = 4 + 3 + 2 = 9, W_c = 4 + 3 + 1 = 8
    rollout = 20 * (2 * 4 + 3 * 2 + 8) * 8  # 3520
    update = (2 * 20 * 9 + 4 * 10 * 9 + 2 * 20 * 8) * 8  # 8320
    assert estimate_rollout_bytes(cfg, obs_dim=4, act_dim=2) == 1.5 * (rollout + update) == 17760
    half = estimate_rollout_bytes(dataclasses.replace(cfg, dtype="float32"), 4, 2)
    assert half == 17760 // 2
    with pytest.raises(ValueError, match="obs_dim"):
        estimate_rollout_bytes(cfg, 0, 2)


def test_check_memory_refuses_with_the_estimate():
    cfg = TRPOConfig(n_envs=4, n_steps=1000)
    need = estimate_rollout_bytes(cfg, 17, 6)
    assert check_memory(cfg, 17, 6, available_bytes=need) == need
    with pytest.raises(MemoryBudgetError, match=r"4 × 1000 = 4000 transitions.*GiB.*n_steps"):
        check_memory(cfg, 17, 6, available_bytes=need - 1)
    assert issubclass(MemoryBudgetError, ValueError)
    with pytest.raises(MemoryBudgetError, match="memory_limit_gb"):
        check_memory(dataclasses.replace(cfg, memory_limit_gb=1e-6), 17, 6)


def test_check_memory_against_this_machine():
    avail = available_memory_bytes()
    assert avail is None or avail > 0
    if avail is None:
        pytest.skip("available memory cannot be determined here")
    check_memory(TRPOConfig(), 4, 2)  # the default batch fits anywhere
    huge = TRPOConfig(n_envs=1024, n_steps=10**9)  # ~10^12 transitions: petabytes
    with pytest.raises(MemoryBudgetError, match="available host memory"):
        check_memory(huge, 376, 17)
