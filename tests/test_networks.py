"""The network choice (trpo.networks): --policy auto|mlp|cnn, --activation; the CNN's Fisher
against double backprop of the mean KL in float64; bad choices are clear errors (the GRU:
tests/test_recurrent.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from natgrad.curvature import fisher_operator
from natgrad.families import kl_divergence
from natgrad.params import ParamSpace
from trpo import TRPOConfig, train
from trpo.envs import FlatNested, make_env
from trpo.evaluation import evaluate_policy, load_policy
from trpo.networks import NatureCNN, PartsNet, build_actor, build_critic, image_parts, pixel_mask
from trpo.normalize import RunningMeanStd
from trpo.policy import Actor
from trpo.run import parse_cli
from trpo.update import _fisher

ROOT = Path(__file__).resolve().parents[1]
IMAGE = gym.spaces.Box(0, 255, (12, 12, 3), np.uint8)
QUIET = dict(plot=False, progress=False, tensorboard=False)


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    return importlib.import_module("image_policy")


def _mean_kl_hvp(actor, params, obs, v):
    space = ParamSpace(params)
    old = actor.functional_dist_params(params, obs)
    old = tuple(t.detach() for t in old) if isinstance(old, tuple) else old.detach()

    def kl(theta):
        new = actor.functional_dist_params(space.unravel(theta), obs)
        return kl_divergence(actor.family, old, new).mean()

    return torch.func.jvp(torch.func.grad(kl), (space.ravel(params),), (v,))[1]


@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,))])
@pytest.mark.parametrize("shape", [(12, 12, 3), (40, 36, 1)])
def test_cnn_fisher_vector_product_is_double_backprop_of_the_mean_kl(action_space, shape):
    space = gym.spaces.Box(0, 255, shape, np.uint8)
    torch.manual_seed(0)
    actor = build_actor(TRPOConfig(hidden_sizes=(16,)), space, action_space).double()
    assert isinstance(actor.net, NatureCNN)
    obs = torch.randint(0, 256, (5, *shape)).double()
    params = {k: v.detach() for k, v in actor.named_parameters()}
    v = torch.randn(ParamSpace(params).numel, dtype=torch.float64)
    F = _fisher(actor, params, obs)
    torch.testing.assert_close(F @ v, _mean_kl_hvp(actor, params, obs, v))
    assert build_critic(TRPOConfig(), space, action_space)(obs.float()).shape == (5,)


def test_relu_mlp_keeps_the_written_out_fisher():
    space = gym.spaces.Box(-1, 1, (4,), np.float32)
    torch.manual_seed(0)
    actor = build_actor(TRPOConfig(activation="relu"), space, gym.spaces.Discrete(3)).double()
    assert isinstance(actor, Actor) and actor.activation == "relu"
    obs = torch.randn(9, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in actor.named_parameters()}
    assert actor.written_out_dist_fn(params, obs) is not None
    v = torch.randn(ParamSpace(params).numel, dtype=torch.float64)
    generic = fisher_operator(actor.functional_dist_params, params, obs, family="categorical")
    torch.testing.assert_close(_fisher(actor, params, obs) @ v, generic @ v)
    torch.testing.assert_close(generic @ v, _mean_kl_hvp(actor, params, obs, v))
    assert actor(obs).shape == (9, 3)


def test_auto_trains_a_cnn_on_images_and_evaluation_rebuilds_it(tmp_path, example):
    config = TRPOConfig(
        env_id="image_policy:ColorPick-v0", n_envs=2, n_steps=32, total_steps=64,
        hidden_sizes=(16,), eval_episodes=1, runs_root=str(tmp_path), **QUIET,
    )
    result = train(config)
    assert isinstance(result.actor.net, NatureCNN) and isinstance(result.critic.net, NatureCNN)
    assert result.metrics["trpo/line_search_success"] == [1.0]
    actor, _, env_id = load_policy(result.run_dir, allow_import=True)
    torch.testing.assert_close(actor.state_dict(), result.actor.state_dict())
    assert len(evaluate_policy(actor, env_id, episodes=1)) == 1


def test_the_command_line_choices_and_bad_combinations(tmp_path, capsys):
    config = parse_cli(["--policy", "mlp", "--activation", "relu", "--hidden-sizes", "32"])
    assert (config.policy, config.activation, config.hidden_sizes) == ("mlp", "relu", (32,))
    with pytest.raises(SystemExit) as exc:
        parse_cli(["--policy", "lstm"])
    assert exc.value.code == 2 and "lstm" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^policy must be 'auto', 'mlp', 'cnn' or 'gru'"):
        TRPOConfig(policy="lstm")
    with pytest.raises(ValueError, match="policy='cnn' needs image observations"):
        train(TRPOConfig(policy="cnn", runs_root=str(tmp_path), **QUIET))
    with pytest.raises(ValueError, match="turn normalize_obs off"):
        build_actor(TRPOConfig(normalize_obs=True), IMAGE, gym.spaces.Discrete(3))
    assert isinstance(build_actor(TRPOConfig(policy="mlp"), IMAGE, gym.spaces.Discrete(3)), Actor)


class _DictObs(gym.Env):
    observation_space = gym.spaces.Dict(
        {"pos": gym.spaces.Box(-1, 1, (2,)), "goal": gym.spaces.Box(-1, 1, (3,))}
    )
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, True, {}


gym.register("DictObs-v0", entry_point=_DictObs)


def test_dict_observations_are_concatenated_for_the_mlp(tmp_path):
    config = TRPOConfig(
        env_id="DictObs-v0", n_envs=2, n_steps=16, total_steps=32, eval_episodes=1,
        runs_root=str(tmp_path), **QUIET,
    )
    result = train(config)
    assert isinstance(result.actor, Actor) and result.actor.layers[0].in_features == 5


def test_the_example_runs(tmp_path, example):
    assert np.isfinite(example.main(["--total-steps", "512", "--runs-root", str(tmp_path)]))


DICT = gym.spaces.Dict(
    {"image": gym.spaces.Box(0, 255, (12, 12, 3), np.uint8),
     "clock": gym.spaces.Box(-5, 5, (2,), np.float32)}
)


def test_image_parts_of_a_dict_follow_gymnasiums_flatten_order():
    flat_space = FlatNested(DICT)
    DICT.seed(0)
    sample = DICT.sample()
    flat = gym.spaces.flatten(DICT, sample)
    parts = image_parts(flat_space)
    assert [shape for _, _, shape in parts] == [(12, 12, 3), None] or \
        [shape for _, _, shape in parts] == [None, (12, 12, 3)]
    for (a, b, shape), key in zip(parts, DICT.spaces):
        np.testing.assert_array_equal(flat[a:b].reshape(shape or -1), sample[key].reshape(shape or -1))
    mask = pixel_mask(flat_space)
    assert mask.sum() == 12 * 12 * 3 and mask.numel() == flat.size
    assert image_parts(FlatNested(gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, (3,))}))) is None
    assert image_parts(FlatNested(gym.spaces.Discrete(4))) is None  # one-hot, no parts


@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,))])
def test_dict_cnn_fisher_vector_product_is_double_backprop_of_the_mean_kl(action_space):
    torch.manual_seed(0)
    actor = build_actor(TRPOConfig(hidden_sizes=(16,)), FlatNested(DICT), action_space).double()
    assert isinstance(actor.net, PartsNet)
    DICT.seed(1)
    obs = torch.tensor(np.stack([gym.spaces.flatten(DICT, DICT.sample()) for _ in range(5)])).double()
    params = {k: v.detach() for k, v in actor.named_parameters()}
    v = torch.randn(ParamSpace(params).numel, dtype=torch.float64)
    torch.testing.assert_close(_fisher(actor, params, obs) @ v, _mean_kl_hvp(actor, params, obs, v))
    # the image part really goes through the CNN: changing one pixel changes the output
    moved = obs.clone()
    moved[:, int(pixel_mask(FlatNested(DICT)).nonzero()[0])] += 50
    out, out_moved = actor(obs), actor(moved)
    first = out[0] if isinstance(out, tuple) else out
    assert not torch.allclose(first, out_moved[0] if isinstance(out_moved, tuple) else out_moved)


def test_the_normaliser_leaves_image_parts_raw_and_standardises_the_rest():
    mask = torch.tensor([True, True, False, False])
    rms = RunningMeanStd((4,), clip=1.0, raw=mask)
    rms.update(np.array([[0.0, 10.0, 0.0, 0.0], [200.0, 30.0, 2.0, 100.0]]))
    x = np.array([[255.0, 7.0, 3.0, 50.0]], dtype=np.float32)
    out = rms.normalize(torch.tensor(x))
    expect = torch.tensor([[255.0, 7.0, 1.0, 0.0]])  # raw, raw, clipped (3-1)/1, (50-50)/50
    torch.testing.assert_close(out, expect)
    np.testing.assert_allclose(rms.numpy_normalizer(np.float32)(x.copy()), expect.numpy())


def test_a_dict_with_an_image_trains_and_evaluation_rebuilds_the_parts_net(tmp_path, example):
    config = TRPOConfig(
        env_id="image_policy:ColorPickDict-v0", n_envs=2, n_steps=32, total_steps=64,
        hidden_sizes=(16,), eval_episodes=1, normalize_obs=True, runs_root=str(tmp_path),
        **QUIET,
    )
    result = train(config)
    assert isinstance(result.actor.net, PartsNet)
    actor, obs_rms, env_id = load_policy(result.run_dir, allow_import=True)
    torch.testing.assert_close(actor.state_dict(), result.actor.state_dict())
    assert torch.equal(obs_rms.raw, pixel_mask(make_env(env_id).observation_space))
    assert len(evaluate_policy(actor, env_id, episodes=1, obs_normalizer=obs_rms)) == 1
