"""Your own module (trpo.modules, trpo.networks): the protocol's checks, the same update as the
built-in MLP for the same architecture, resume and evaluation through a factory path."""

from __future__ import annotations

import importlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from trpo import TRPOConfig, config_for, train
from trpo.checkpoint import CheckpointError
from trpo.evaluate import main as evaluate_main
from trpo.evaluation import evaluate_policy, load_policy
from trpo.modules import ModuleActor, ModuleCritic, ModuleProtocolError
from trpo.policy import make_actor, make_critic
from trpo.run import parse_cli

ROOT = Path(__file__).resolve().parents[1]
BOX4 = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
FAST = dict(
    n_envs=2, n_steps=64, total_steps=128, cg_iters=5, critic_epochs=2, critic_minibatch_size=64,
    eval_episodes=0, plot=False, progress=False, tensorboard=False,
)


@pytest.fixture
def example(monkeypatch):
    """examples/custom_module.py importable as ``custom_module`` (its factories)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return importlib.import_module("custom_module")


def _mlp(sizes, last=None):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _copy_mlp(src: nn.Module, dst: nn.Sequential) -> None:
    linears = [m for m in dst if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer, mine in zip(src.layers, linears):
            mine.weight.copy_(layer.weight)
            mine.bias.copy_(layer.bias)


@pytest.mark.parametrize(
    ("space", "out", "match"),
    [
        (gym.spaces.Discrete(2), 3, r"must return logits \(B, 2\)"),
        (gym.spaces.Box(-1, 1, (2,)), 3, r"must return the mean \(B, 2\)"),
        (gym.spaces.MultiDiscrete([2, 3]), 4, r"logits \(B, 5\) or a list"),
        (gym.spaces.MultiBinary(3), 2, r"logits \(B, 3\)"),
    ],
)
def test_a_wrong_output_shape_is_one_typed_error_naming_the_fix(space, out, match):
    with pytest.raises(ModuleProtocolError, match=match) as exc:
        ModuleActor(nn.Linear(4, out), BOX4, space)
    assert "fix its output layer" in str(exc.value) and isinstance(exc.value, ValueError)
    with pytest.raises(ModuleProtocolError, match=r"values of shape \(B,\) or \(B, 1\)"):
        ModuleCritic(nn.Linear(4, 2), BOX4)


@pytest.mark.parametrize("space", [gym.spaces.MultiDiscrete([2, 3]), gym.spaces.Box(-1, 1, (2,))])
def test_the_accepted_output_forms(space):
    net = nn.Linear(4, 5 if isinstance(space, gym.spaces.MultiDiscrete) else 2)
    actor = ModuleActor(net, BOX4, space)
    dist = actor(torch.randn(7, 4))
    if actor.family == "multi_categorical":
        assert [t.shape for t in dist] == [(7, 2), (7, 3)]
    else:
        assert dist[0].shape == (7, 2) and dist[1] is actor.log_std  # added log σ
    assert ModuleCritic(nn.Linear(4, 1), BOX4)(torch.randn(7, 4)).shape == (7,)


def test_train_mode_batchnorm_is_refused_with_the_reason_and_eval_mode_trains(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(ModuleProtocolError, match=r"BatchNorm1d\) is in train mode.*\.eval\(\)"):
        ModuleActor(net, BOX4, gym.spaces.Discrete(2))
    net.eval()
    before = net[1].running_mean.clone()
    result = train(TRPOConfig(runs_root=str(tmp_path), **FAST), actor=net)
    assert torch.equal(net[1].running_mean, before)  # constant buffers
    assert "net.1.running_mean" in result.actor.state_dict()
    assert result.metrics["trpo/line_search_success"] == [1.0]


def _pendulum(tmp_path, name, **kw):
    return config_for(
        "Pendulum-v1", runs_root=str(tmp_path), run_name=name, dtype="float64", **FAST, **kw
    )


def test_a_user_module_with_the_built_in_architecture_takes_the_same_update(tmp_path):
    builtin = train(_pendulum(tmp_path, "builtin"))
    env = gym.make("Pendulum-v1")
    spaces = env.observation_space, env.action_space
    env.close()
    torch.manual_seed(1)  # the seed _build uses: the built-in networks' initialisation
    ref_actor, ref_critic = make_actor(*spaces), make_critic(spaces[0])
    actor, critic = _mlp((3, 64, 64, 1)), _mlp((3, 64, 64, 1))
    _copy_mlp(ref_actor, actor)
    _copy_mlp(ref_critic, critic)
    mine = train(_pendulum(tmp_path, "mine"), actor=actor, critic=critic)
    assert mine.actor.net is actor and isinstance(mine.actor, ModuleActor)
    assert builtin.metrics["trpo/line_search_success"] == [1.0]
    moved = builtin.actor.layers[0].weight - ref_actor.layers[0].weight.double()
    assert moved.abs().max() > 1e-4  # the update did something
    # the generic Fisher of the module and the written-out one of the MLP, torch and numpy
    # rollouts: the same numbers up to rounding
    for a, b in [
        (builtin.actor.layers[0].weight, actor[0].weight),
        (builtin.actor.layers[2].bias, actor[4].bias),
        (builtin.actor.log_std, mine.actor.log_std),
        (builtin.critic.layers[1].weight, critic[2].weight),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for key in ("trpo/kl", "trpo/grad_norm", "natgrad/cg_residual"):
        assert builtin.metrics[key] == pytest.approx(mine.metrics[key], rel=1e-6)


def test_resume_and_evaluate_through_factory_paths(tmp_path, example, capsys):
    factories = dict(
        actor_factory="custom_module:make_actor", critic_factory="custom_module:make_critic"
    )
    first = train(_pendulum(tmp_path, "run", **factories))
    assert isinstance(first.actor, ModuleActor) and isinstance(first.critic, ModuleCritic)
    run_dir = str(first.run_dir)
    resumed = train(TRPOConfig(resume=run_dir, total_steps=256))
    assert resumed.global_step == 256 and isinstance(resumed.actor, ModuleActor)
    with pytest.raises(ValueError, match="actor_factory 'custom_module:make_actor'.*--allow-import"):
        load_policy(run_dir)
    actor, obs_rms, env_id = load_policy(run_dir, allow_import=True)
    torch.testing.assert_close(actor.state_dict(), resumed.actor.state_dict())
    assert len(evaluate_policy(actor, env_id, episodes=1, obs_normalizer=obs_rms)) == 1
    assert evaluate_main([run_dir, "--episodes", "1", "--allow-import"]) == 0
    # the command line has the fields as flags
    config = parse_cli(["--env", "Pendulum-v1", "--actor-factory", "custom_module:make_actor"])
    assert config.actor_factory == "custom_module:make_actor" and config.critic_factory is None
    with pytest.raises(ValueError, match="^actor_factory must be None or an import path"):
        TRPOConfig(actor_factory="custom_module.make_actor")


def test_a_run_of_modules_without_factory_needs_the_modules_again(tmp_path, example):
    env = gym.make("Pendulum-v1")
    spaces = env.observation_space, env.action_space
    env.close()
    first = train(_pendulum(tmp_path, "run"), actor=example.make_actor(*spaces))
    run_dir = str(first.run_dir)
    with pytest.raises(CheckpointError, match=r"actor was a module passed to train\(actor=...\)"):
        train(TRPOConfig(resume=run_dir, total_steps=256))
    resumed = train(TRPOConfig(resume=run_dir, total_steps=256), actor=example.make_actor(*spaces))
    assert resumed.global_step == 256
    with pytest.raises(CheckpointError, match="actor_factory='package.module:factory'"):
        load_policy(run_dir)
    actor, _, _ = load_policy(run_dir, actor=example.make_actor(*spaces))
    torch.testing.assert_close(actor.state_dict(), resumed.actor.state_dict())


def test_the_example_runs(tmp_path, example):
    mean = example.main(["--total-steps", "256", "--runs-root", str(tmp_path)])
    assert np.isfinite(mean)
