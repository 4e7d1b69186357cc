"""Tests of trpo.config: validation, given fields and resume merging, JSON round trip, run names."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import pickle

import pytest
import torch

from trpo.config import (
    FIXED_ON_RESUME,
    LOG_STD_INIT_BOUND,
    TRPOConfig,
    check_device,
    check_env_id,
    default_run_name,
    load_config,
    resume_config,
    save_config,
)
from trpo.presets import config_for

FIELDS = [f.name for f in dataclasses.fields(TRPOConfig)]


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
    ("run_name", "."),
    ("run_name", ".."),
    ("run_name", "../x"),
    ("memory_limit_gb", 0.0),
    ("normalize_obs", "yes"),
    ("log_std_init", math.nan),
    ("log_std_init", 1e300),  # exp overflows: σ = inf
    ("log_std_init", -20.5),  # σ ≈ 10⁻⁹: the Gaussian's density overflows
    ("runs_root", ""),
    ("env_backend", "gym"),
    ("env_backend", None),
    ("env_threads", -1),
    ("env_threads", 1.5),
    ("actor_factory", "pkg.mod"),
    ("actor_factory", "pkg/mod:f"),
    ("critic_factory", ":f"),
    ("action_masks", "true"),
    ("policy", "lstm"),
    ("bptt_length", -1),
    ("activation", "elu"),
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
        dict(log_std_init=20.0),
        dict(log_std_init=-20.0),
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


def test_batch_size():
    assert TRPOConfig(n_envs=2, n_steps=512).batch_size == 1024


def test_log_std_init_error_gives_the_usable_range():
    with pytest.raises(ValueError, match=r"^log_std_init must be in \[-20, 20\] \(got 1e\+300\)"):
        TRPOConfig(log_std_init=1e300)
    # the bound keeps σ finite and nonzero even in float32
    big = torch.tensor(LOG_STD_INIT_BOUND, dtype=torch.float32)
    assert torch.isfinite(big.exp()) and (-big).exp() > 0


def test_check_device_refuses_a_device_this_machine_lacks():
    check_device("cpu")
    check_device("auto")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"device 'cuda:{count}' is not available.*--device cpu"):
        check_device(f"cuda:{count}")
    if count == 0:
        with pytest.raises(ValueError, match="device 'cuda' is not available"):
            check_device("cuda")
    else:
        check_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device 'mps' is not available"):
            check_device("mps")
    TRPOConfig(device=f"cuda:{count}")  # a config for another machine still loads


def test_torch_dtype_and_device():
    assert TRPOConfig(dtype="float64").torch_dtype() is torch.float64
    assert TRPOConfig().torch_device() == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert TRPOConfig(device="auto").torch_device().type == expected


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


# --- given fields and resume merging ----------------------------------------------------------
def test_given_fields_are_the_constructor_arguments():
    assert TRPOConfig().given_fields == frozenset()
    cfg = TRPOConfig(critic_epochs=10, seed=3)  # 10 is the default: still given
    assert cfg.given_fields == {"critic_epochs", "seed"}
    assert TRPOConfig("Pendulum-v1", 500).given_fields == {"env_id", "total_steps"}
    # They survive pickling (the distributed broadcast) and copies, and do not change equality.
    assert pickle.loads(pickle.dumps(cfg)).given_fields == cfg.given_fields
    assert cfg == TRPOConfig(seed=3)
    assert dataclasses.replace(cfg, seed=4).given_fields == set(FIELDS)  # replace passes all
    assert cfg.with_given(["max_kl"]).given_fields == {"max_kl"}
    assert cfg.given_fields == {"critic_epochs", "seed"}  # with_given made a copy
    with pytest.raises(ValueError, match="unknown TRPOConfig field.*max_kll"):
        cfg.with_given(["max_kll"])


def test_config_for_counts_only_the_env_and_the_overrides_as_given():
    cfg = config_for("Hopper-v5", critic_epochs=10)
    assert cfg.given_fields == {"env_id", "critic_epochs"}
    assert cfg.n_steps == 1024  # the preset is applied, but not given


@pytest.fixture
def saved_run(tmp_path):
    """A run directory whose config differs from both the defaults and the Pendulum preset."""
    saved = config_for(
        "Pendulum-v1", cg_damping=0.05, gae_lambda=0.9, critic_epochs=5, n_envs=2, seed=7
    )
    save_config(saved, tmp_path / "pend")
    return saved, str(tmp_path / "pend")


def test_resume_config_keeps_the_saved_fields_the_caller_did_not_give(saved_run):
    saved, run_dir = saved_run
    expected = dataclasses.replace(saved, resume=run_dir, run_name="pend")
    # From the preset (issue 13.5: the preset's 0.1 / 0.95 / 20 / 4 replaced the saved ones).
    assert resume_config(config_for("Pendulum-v1", resume=run_dir)) == expected
    assert resume_config(TRPOConfig(resume=run_dir)) == expected
    # A given field wins even when it equals the default (critic_epochs 10 was ignored).
    got = resume_config(TRPOConfig(resume=run_dir, critic_epochs=10, total_steps=9999))
    assert got == dataclasses.replace(expected, critic_epochs=10, total_steps=9999)
    got = resume_config(config_for("Pendulum-v1", resume=run_dir, n_envs=4))
    assert got == dataclasses.replace(expected, n_envs=4)
    assert resume_config(got) == got  # idempotent: train() merges what parse_cli merged


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("env_id", "CartPole-v1"),
        ("hidden_sizes", (32,)),
        ("normalize_obs", False),
        ("normalize_reward", False),
        ("actor_factory", "pkg.mod:actor"),
        ("policy", "cnn"),
        ("activation", "relu"),
    ],
)
def test_resume_config_refuses_what_the_checkpoint_fixes(saved_run, field, value):
    saved, run_dir = saved_run
    assert field in FIXED_ON_RESUME
    with pytest.raises(ValueError, match=rf"^{field} is .* a resumed run keeps its {field}"):
        resume_config(TRPOConfig(resume=run_dir, **{field: value}))
    # Giving the saved value is no change, and fine.
    assert resume_config(TRPOConfig(resume=run_dir, **{field: getattr(saved, field)})) == (
        dataclasses.replace(saved, resume=run_dir, run_name="pend")
    )


def test_resume_config_errors(tmp_path):
    with pytest.raises(ValueError, match="resume is None"):
        resume_config(TRPOConfig())
    with pytest.raises(ValueError, match="config.json not found"):
        resume_config(TRPOConfig(resume=str(tmp_path / "missing")))
