"""Tests for trpo.normalize: RunningMeanStd and RewardScaler against numpy / hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trpo.normalize import RewardScaler, RunningMeanStd


def test_running_stats_equal_numpy_on_the_concatenation():
    rng = np.random.default_rng(0)
    rms = RunningMeanStd((3,))
    batches = [rng.normal(5.0, 3.0, size=(n, 3)) for n in (1, 17, 0, 4, 100)]
    for b in batches:
        rms.update(torch.from_numpy(b))
    all_x = np.concatenate(batches)
    assert float(rms.count) == len(all_x)
    np.testing.assert_allclose(rms.mean.numpy(), all_x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rms.var.numpy(), all_x.var(0), rtol=1e-12)
    assert rms.mean.dtype == torch.float64


def test_merging_moments_is_order_independent_and_equals_the_union():
    rng = np.random.default_rng(1)
    xa, xb = rng.normal(size=(30, 2)), rng.normal(3.0, 2.0, size=(11, 2))
    a, b = RunningMeanStd((2,)), RunningMeanStd((2,))
    a.update(xa)
    b.update(xb)
    ab = RunningMeanStd((2,))
    ab.update_from_moments(a.mean, a.var, a.count)
    ab.update_from_moments(b.mean, b.var, b.count)
    ba = RunningMeanStd((2,))
    ba.update_from_moments(b.mean, b.var, b.count)
    ba.update_from_moments(a.mean, a.var, a.count)
    union = np.concatenate([xa, xb])
    for rms in (ab, ba):
        np.testing.assert_allclose(rms.mean.numpy(), union.mean(0), rtol=1e-12)
        np.testing.assert_allclose(rms.var.numpy(), union.var(0), rtol=1e-12)
    # update() is the same merge.
    c = RunningMeanStd((2,))
    c.update(xa)
    c.update(xb)
    torch.testing.assert_close(c.var, ab.var)


def test_normalize_formula_dtype_and_clip():
    rms = RunningMeanStd((2,), epsilon=1e-8, clip=3.0)
    x0 = torch.zeros(2, 2)
    assert torch.equal(rms.normalize(x0), x0)  # identity before any update
    data = torch.tensor([[0.0, 10.0], [2.0, 30.0], [4.0, 20.0]], dtype=torch.float64)
    rms.update(data)
    x = torch.tensor([[1.0, 20.0], [100.0, -100.0]], dtype=torch.float32)
    expected = ((x.double() - data.mean(0)) / torch.sqrt(data.var(0, correction=0) + 1e-8)).clamp(
        -3.0, 3.0
    )
    out = rms.normalize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float())
    assert out[1, 0] == 3.0 and out[1, 1] == -3.0
    # Per-row and whole-batch results are identical (the rollout relies on it).
    assert torch.equal(torch.stack([rms.normalize(r) for r in x]), out)
    # Statistics change -> cached factors are refreshed.
    rms.update(torch.full((3, 2), 50.0))
    assert not torch.equal(rms.normalize(x), out)


def test_frozen_does_not_update():
    rms = RunningMeanStd((1,), frozen=True)
    rms.update(torch.ones(5, 1))
    assert float(rms.count) == 0 and rms.mean.item() == 0.0 and rms.var.item() == 1.0
    rms.frozen = False
    rms.update(torch.ones(5, 1))
    assert float(rms.count) == 5


def test_state_dict_roundtrip_weights_only(tmp_path):
    rms = RunningMeanStd((4,))
    rms.update(torch.randn(9, 4, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "rms.pt"
    torch.save(rms.state_dict(), path)
    loaded = RunningMeanStd((4,), frozen=True)
    loaded.load_state_dict(torch.load(path, weights_only=True))
    for k in ("count", "mean", "var"):
        assert torch.equal(getattr(loaded, k), getattr(rms, k))
    x = torch.randn(3, 4)
    assert torch.equal(loaded.normalize(x), rms.normalize(x))


def test_bad_inputs():
    rms = RunningMeanStd((2,))
    with pytest.raises(ValueError, match="shape"):
        rms.update(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        rms.update(torch.tensor([[0.0, float("nan")]]))
    assert float(rms.count) == 0
    with pytest.raises(ValueError, match="shapes"):
        rms.load_state_dict(RunningMeanStd((3,)).state_dict())
    with pytest.raises(ValueError, match="missing"):
        rms.load_state_dict({"mean": torch.zeros(2)})
    with pytest.raises(ValueError, match="clip"):
        RunningMeanStd((2,), clip=0.0)


def test_reward_scaler_hand_computed():
    # γ = 0.5, two envs. Env 0 ends after t = 1.
    #   env 0: r = 2, 4, 6 -> R = 2, 0.5·2 + 4 = 5, (reset) 6
    #   env 1: r = 0, 2, 2 -> R = 0, 2, 0.5·2 + 2 = 3
    # R values {2, 5, 6, 0, 2, 3}: mean 3, var (1 + 4 + 9 + 9 + 1 + 0)/6 = 4 -> std 2.
    scaler = RewardScaler(gamma=0.5, n_envs=2, epsilon=0.0)
    rewards = torch.tensor([[2.0, 0.0], [4.0, 2.0], [6.0, 2.0]])
    dones = torch.tensor([[False, False], [True, False], [False, False]])
    out = scaler.scale(rewards, dones)
    torch.testing.assert_close(out, rewards / 2.0)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(scaler.returns, [6.0, 3.0])
    # Next step continues the accumulators: R = 0.5·6 + 2 = 5 and 0.5·3 + 0 = 1.5 (env 1 ends).
    out2 = scaler.scale(torch.tensor([2.0, 0.0]), torch.tensor([False, True]))
    all_r = np.array([2, 5, 6, 0, 2, 3, 5, 1.5])
    torch.testing.assert_close(out2, torch.tensor([2.0, 0.0]) / float(np.sqrt(all_r.var())))
    np.testing.assert_allclose(scaler.returns, [5.0, 0.0])
    assert float(scaler.return_rms.count) == 8


def test_reward_scaler_frozen_clip_and_state(tmp_path):
    scaler = RewardScaler(gamma=0.9, n_envs=3, clip=1.0)
    rewards = torch.randn(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dones = torch.zeros(20, 3, dtype=torch.bool)
    dones[7, 1] = True
    out = scaler.scale(rewards, dones)
    assert out.abs().max() <= 1.0
    torch.save(scaler.state_dict(), tmp_path / "s.pt")
    other = RewardScaler(gamma=0.9, n_envs=3, clip=1.0, frozen=True)
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    np.testing.assert_array_equal(other.returns, scaler.returns)
    before = other.state_dict()
    out_frozen = other.scale(rewards, dones)
    after = other.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k])
    torch.testing.assert_close(out_frozen, (rewards / scaler.return_rms.std).clamp(-1, 1))
    with pytest.raises(ValueError, match="gamma"):
        RewardScaler(gamma=0.0, n_envs=1)
    with pytest.raises(ValueError, match="rewards and dones"):
        scaler.scale(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_normalizer_is_identical_to_normalize(dtype):
    rms = RunningMeanStd((3,), clip=2.0)
    rms.update(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    x = (np.random.default_rng(0).normal(size=(20, 3)) * 4).astype(dtype)
    out = rms.numpy_normalizer(dtype)(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, rms.normalize(torch.from_numpy(x)).numpy())
    assert np.abs(out).max() == 2.0
