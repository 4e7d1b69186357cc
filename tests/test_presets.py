"""Tests of trpo.presets: the per-env presets and config_for's layering."""

from __future__ import annotations

import dataclasses

import pytest

from trpo.config import TRPOConfig
from trpo.presets import BACKEND_PRESETS, PRESETS, config_for
from trpo.run import parse_cli

FIELDS = [f.name for f in dataclasses.fields(TRPOConfig)]
MUJOCO = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")


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
    # Hopper learns faster without normalisation (docs/benchmarks.md); the others keep zoo's.
    normalised = env_id != "Hopper-v5"
    assert cfg.normalize_obs == cfg.normalize_reward == normalised
    assert cfg.total_steps == 1_000_000
    assert cfg.max_kl == (0.04 if env_id == "HalfCheetah-v5" else 0.01)
    # HalfCheetah and Walker2d start with σ = e^-0.5 (with σ = 1 HalfCheetah seeds flip onto
    # their backs and a Walker2d seed collapses; docs/benchmarks.md).
    assert cfg.log_std_init == (0.0 if env_id == "Hopper-v5" else -0.5)


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


def test_backend_presets_layer_between_the_env_preset_and_the_overrides():
    for (env_id, backend), preset in BACKEND_PRESETS.items():
        assert set(preset) <= set(FIELDS) and env_id in PRESETS
        cfg = config_for(env_id, env_backend=backend)
        assert all(getattr(cfg, k) == v for k, v in preset.items())
        # the env's preset stays where the backend's does not override it
        kept = set(PRESETS[env_id]) - set(preset)
        assert kept and all(getattr(cfg, k) == PRESETS[env_id][k] for k in kept)
    hopper = BACKEND_PRESETS["Hopper-v5", "envpool"]
    assert config_for("Hopper-v5").n_envs == PRESETS["Hopper-v5"]["n_envs"] != hopper["n_envs"]
    cfg = config_for("Hopper-v5", env_backend="envpool", n_envs=4)  # the user's value wins
    assert cfg.n_envs == 4 and cfg.n_steps == hopper["n_steps"]
    assert "n_envs" in cfg.given_fields and "n_steps" not in cfg.given_fields


def test_the_cli_picks_the_backend_preset():
    hopper = BACKEND_PRESETS["Hopper-v5", "envpool"]
    cfg = parse_cli(["--env", "Hopper-v5", "--env-backend", "envpool"])
    assert (cfg.env_backend, cfg.n_envs, cfg.fvp_fraction) == (
        "envpool", hopper["n_envs"], hopper["fvp_fraction"])
    cfg = parse_cli(["--env", "Hopper-v5", "--env-backend=envpool", "--max-kl", "0.005"])
    assert cfg.n_envs == hopper["n_envs"] and cfg.max_kl == 0.005
    assert parse_cli(["--env", "Hopper-v5"]).n_envs == PRESETS["Hopper-v5"]["n_envs"]
