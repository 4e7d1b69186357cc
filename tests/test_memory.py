"""Tests of trpo.memory: the rollout/update memory estimate and the budget check."""

from __future__ import annotations

import dataclasses

import pytest

from trpo.config import TRPOConfig
from trpo.memory import (
    MemoryBudgetError,
    available_memory_bytes,
    check_memory,
    estimate_rollout_bytes,
)


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
