"""Tests of natgrad.status, the one status mechanism, and of its users' enums."""

from __future__ import annotations

import doctest
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import natgrad.status
from natgrad.cg import CGError, CGStatus
from natgrad.status import ResultStatus, SolverError, Status
from natgrad.trust_region import LineSearchStatus, StepStatus


class Toy(Status):
    OK = "ok", "all good", True
    SLOW = "slow", "took long: raise maxiter", False
    BROKEN = "broken", "broke: add damping", False


class ToyError(SolverError):
    pass


@dataclass(frozen=True)
class ToyResult(ResultStatus):
    status_type = Toy
    error_type = ToyError

    status_code: Tensor


def _result(*codes: int) -> ToyResult:
    return ToyResult(torch.tensor(codes if len(codes) != 1 else codes[0], dtype=torch.int8))


def test_members_carry_value_message_success_and_code() -> None:
    assert Toy.SLOW == "slow" and Toy("slow") is Toy.SLOW and isinstance(Toy.SLOW, str)
    assert Toy.SLOW.message == "took long: raise maxiter"
    assert Toy.OK.success and not Toy.BROKEN.success
    assert [Toy.code(m) for m in Toy] == [0, 1, 2]
    assert Toy.code("broken") == 2 and Toy.from_code(1) is Toy.SLOW
    assert Toy.worst(torch.tensor([1, 0, 1])) is Toy.SLOW
    assert Toy.worst(torch.tensor([], dtype=torch.int8)) is Toy.OK


def test_result_summarises_columns_by_the_most_severe() -> None:
    res = _result(0, 2, 1)
    assert res.statuses == (Toy.OK, Toy.BROKEN, Toy.SLOW)
    assert res.status is Toy.BROKEN and not res.success
    assert res.message == "broke: add damping"
    assert res.status_mask(Toy.SLOW, "broken").tolist() == [False, True, True]
    single = _result(0)
    assert single.statuses == (Toy.OK,) and single.success


def test_raise_if_failed_raises_the_result_error_type_unless_allowed() -> None:
    assert _result(0, 0).raise_if_failed() is not None
    slow = _result(0, 1)
    with pytest.raises(ToyError, match="took long") as info:
        slow.raise_if_failed()
    assert isinstance(info.value, SolverError) and info.value.result is slow
    assert slow.raise_if_failed(allow=("slow",)) is slow
    with pytest.raises(ToyError):
        _result(2).raise_if_failed(allow=(Toy.SLOW,))


@pytest.mark.parametrize("enum", [CGStatus, StepStatus, LineSearchStatus])
def test_natgrad_enums_use_the_one_mechanism(enum: type[Status]) -> None:
    members = list(enum)
    assert issubclass(enum, Status)
    # Exactly the first member(s) are successes: severity grows along the declaration.
    flags = [m.success for m in members]
    assert flags[0] and flags == sorted(flags, reverse=True)
    for m in members:
        assert m.value == m.name.lower() and len(m.message) > 20


def test_cg_error_keeps_its_name_and_is_a_solver_error() -> None:
    assert issubclass(CGError, SolverError) and issubclass(SolverError, RuntimeError)


def test_module_docstring_examples() -> None:
    result = doctest.testmod(natgrad.status)
    assert result.attempted > 0 and result.failed == 0
