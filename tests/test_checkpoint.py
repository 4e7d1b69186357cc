"""Tests of trpo.checkpoint: round trips, corruption, fallback, crafted pickles, kills."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from trpo.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    save_run_checkpoint,
    verify_checkpoint,
)


def assert_same(a, b, where="state"):
    """Recursive equality with exact tensor comparison (dtype, shape and values)."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _training_state() -> tuple[dict, torch.Generator, np.random.Generator]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).pow(2).mean().backward()
    opt.step()
    gen = torch.Generator().manual_seed(123)
    rng = np.random.default_rng(7)
    torch.rand(3, generator=gen)  # advance past the seeded state
    rng.random(5)
    state = {
        "update": 3,
        "global_step": 3072,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "obs_rms": {"mean": torch.zeros(3, dtype=torch.float64), "count": 1e-4},
        "rng": capture_rng_state(torch_generator=gen, numpy_generator=rng),
        "misc": [1, 2.5, "text", None, True, (1, 2), {"nested": torch.arange(4)}],
        "config": {"env_id": "CartPole-v1", "hidden_sizes": [64, 64]},
    }
    return state, gen, rng


# --- round trips --------------------------------------------------------------------------------
def test_round_trip_of_a_nested_training_state(tmp_path):
    state, _, _ = _training_state()
    path = save_checkpoint(checkpoint_path(tmp_path, 3), state)
    assert path == tmp_path / "checkpoints" / "ckpt_000003.pt"
    assert_same(load_checkpoint(path), state)
    # The file is a plain torch file, loadable by anyone with the safe loader.
    assert_same(torch.load(path, weights_only=True), state)
    record = json.loads((path.parent / "ckpt_000003.pt.sha256").read_text())
    assert record["size"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_rng_states_restore_the_same_streams(tmp_path):
    state, gen, rng = _training_state()
    torch.manual_seed(99)
    snap = capture_rng_state(torch_generator=gen, numpy_generator=rng)
    save_checkpoint(tmp_path / "c.pt", {"rng": snap})
    expected = (torch.rand(4, generator=gen), rng.random(4), rng.integers(0, 2**62), torch.rand(2))
    restored = load_checkpoint(tmp_path / "c.pt")["rng"]
    gen2, rng2 = torch.Generator(), np.random.default_rng(0)
    torch.manual_seed(0)
    restore_rng_state(restored, torch_generator=gen2, numpy_generator=rng2)
    got = (torch.rand(4, generator=gen2), rng2.random(4), rng2.integers(0, 2**62), torch.rand(2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_numpy_generators_with_array_state_round_trip(tmp_path):
    rng = np.random.Generator(np.random.MT19937(5))  # its state holds a uint32 array
    rng.random(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state(numpy_generator=rng)})
    expected = rng.random(3)
    other = np.random.Generator(np.random.MT19937(0))
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], numpy_generator=other)
    assert np.array_equal(other.random(3), expected)
    with pytest.raises(ValueError, match="PCG64.*MT19937"):
        restore_rng_state(
            load_checkpoint(tmp_path / "c.pt")["rng"], numpy_generator=np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match="torch_generator"):
        restore_rng_state({}, torch_generator=torch.Generator())


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"obs_mean": np.zeros(3)}, r"state\['obs_mean'\].*from_numpy"),
        ({"a": {"b": [1, np.float32(2.0)]}}, r"state\['a'\]\['b'\]\[1\].*item"),
        ({"f": lambda x: x}, r"state\['f'\].*function"),
        ({"s": frozenset({1})}, r"state\['s'\].*frozenset"),
        ({"path": Path("/tmp")}, r"state\['path'\].*Path"),
    ],
)
def test_non_plain_state_is_refused_before_writing(tmp_path, state, where):
    with pytest.raises(ValueError, match=where):
        save_checkpoint(tmp_path / "c.pt", state)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="dict"):
        save_checkpoint(tmp_path / "c.pt", [1, 2])  # type: ignore[arg-type]


# --- corruption and fallback ------------------------------------------------------------------
def _three_checkpoints(run_dir: Path) -> list[Path]:
    return [
        save_run_checkpoint(run_dir, u, {"update": u, "w": torch.full((64,), float(u))})
        for u in (10, 20, 30)
    ]


def test_truncated_checkpoint_is_named_and_resume_falls_back(tmp_path):
    p10, p20, p30 = _three_checkpoints(tmp_path)
    data = p30.read_bytes()
    p30.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{p30}.*truncated"):
        load_checkpoint(p30)
    assert latest_checkpoint(tmp_path) == p20
    loaded = load_latest_checkpoint(tmp_path)
    assert (loaded.path, loaded.update, loaded.state["update"]) == (p20, 20, 20)
    assert [p for p, _ in loaded.skipped] == [p30]
    assert "truncated" in loaded.skipped[0][1]


def test_flipped_byte_fails_the_checksum(tmp_path):
    _, p20, p30 = _three_checkpoints(tmp_path)
    data = bytearray(p30.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    p30.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{p30}.*SHA-256"):
        verify_checkpoint(p30)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p30)
    assert load_latest_checkpoint(tmp_path).path == p20


def test_missing_record_and_missing_file(tmp_path):
    p10, p20, p30 = _three_checkpoints(tmp_path)
    (p30.parent / (p30.name + ".sha256")).unlink()
    with pytest.raises(CheckpointError, match="no checksum record"):
        load_checkpoint(p30)
    assert load_checkpoint(p30, verify=False)["update"] == 30
    assert latest_checkpoint(tmp_path) == p20
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_no_valid_checkpoint_lists_every_reason(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) is None
    for p in _three_checkpoints(tmp_path):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint.*ckpt_000030.*ckpt_000010"):
        load_latest_checkpoint(tmp_path)


def _write_with_record(path: Path, data: bytes) -> None:
    """Write ``data`` with a *matching* record, so only the safe loader can stop it."""
    path.write_bytes(data)
    record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.with_name(path.name + ".sha256").write_text(json.dumps(record))


def test_a_valid_non_dict_payload_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    _write_with_record(path, path.read_bytes())
    with pytest.raises(CheckpointError, match="list, not a dict"):
        load_checkpoint(path)


# --- untrusted checkpoints ----------------------------------------------------------------------
class _Evil:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = {"update": 1, "model": {"b": [0.5, 1.5]}, "x": _Evil(marker)}
    path = checkpoint_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    if fmt == "torch_zip":
        torch.save(payload, path)
        data = path.read_bytes()
    else:
        data = pickle.dumps(payload, protocol=2)  # the protocol torch.load expects
    _write_with_record(path, data)
    # Control: the payload is live; an unsafe load would run it.
    if fmt == "raw_pickle":
        pickle.loads(data)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=rf"{path}.*weights_only.*system") as exc:
        load_checkpoint(path)
    assert isinstance(exc.value.__cause__, pickle.UnpicklingError)  # refused, not misparsed
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_latest_checkpoint(tmp_path)
    assert not marker.exists()


# --- interrupted writes -------------------------------------------------------------------------
@pytest.mark.parametrize("fail_on_call", [1, 2])  # 1: the record's rename, 2: the checkpoint's
def test_interrupted_write_leaves_the_previous_latest(tmp_path, monkeypatch, fail_on_call):
    p10, p20, p30 = _three_checkpoints(tmp_path)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt("killed between temp write and rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_run_checkpoint(tmp_path, 40, {"update": 40, "w": torch.zeros(64)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not checkpoint_path(tmp_path, 40).exists()
    assert latest_checkpoint(tmp_path) == p30
    assert load_latest_checkpoint(tmp_path).state["update"] == 30
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temp file was removed on the way out


def test_interrupted_overwrite_of_the_same_name_is_detected(tmp_path, monkeypatch):
    p10, p20, p30 = _three_checkpoints(tmp_path)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # new record in place, old checkpoint bytes still there
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p30, {"update": 30, "w": torch.zeros(3)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert latest_checkpoint(tmp_path) == p20
    assert load_latest_checkpoint(tmp_path).skipped[0][0] == p30


def test_sigkill_between_temp_write_and_rename(tmp_path):
    """A real SIGKILL (no cleanup code runs) just before the checkpoint's rename."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from trpo.checkpoint import checkpoint_path, save_run_checkpoint
        run_dir = {str(tmp_path)!r}
        save_run_checkpoint(run_dir, 1, {{"update": 1, "w": torch.ones(8)}})
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("ckpt_000002.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace
        save_run_checkpoint(run_dir, 2, {{"update": 2, "w": torch.zeros(8)}})
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert any(n.startswith(".tmp_ckpt_000002.pt") for n in names)  # the orphaned temp file
    assert [u for u, _ in list_checkpoints(tmp_path)] == [1]
    assert load_latest_checkpoint(tmp_path).state["update"] == 1
    prune_checkpoints(tmp_path, keep=3)  # the next save cleans up temp files and orphan records
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt_000001.pt",
        "ckpt_000001.pt.sha256",
    ]


# --- naming and rotation ------------------------------------------------------------------------
def test_names_sort_by_update_not_by_text(tmp_path):
    assert checkpoint_path(tmp_path, 123).name == "ckpt_000123.pt"
    assert checkpoint_path(tmp_path, 1234567).name == "ckpt_1234567.pt"
    with pytest.raises(ValueError, match="update"):
        checkpoint_path(tmp_path, -1)
    for u in (999_999, 1_000_000, 5):
        save_checkpoint(checkpoint_path(tmp_path, u), {"u": u})
    assert [u for u, _ in list_checkpoints(tmp_path)] == [1_000_000, 999_999, 5]
    assert load_latest_checkpoint(tmp_path).state["u"] == 1_000_000


def test_rotation_keeps_the_newest_k(tmp_path):
    for u in range(1, 6):
        save_run_checkpoint(tmp_path, u, {"u": u}, keep=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"ckpt_00000{u}.pt{s}" for u in (3, 4, 5) for s in ("", ".sha256")]
    (tmp_path / "checkpoints" / "ckpt_000009.pt.sha256").write_text("{}")  # orphan record
    deleted = prune_checkpoints(tmp_path, keep=1)
    assert {p.name for p in deleted} == {
        "ckpt_000003.pt",
        "ckpt_000003.pt.sha256",
        "ckpt_000004.pt",
        "ckpt_000004.pt.sha256",
        "ckpt_000009.pt.sha256",
    }
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_map_location(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(2)})
    assert (
        load_checkpoint(tmp_path / "c.pt", map_location=torch.device("cpu"))["w"].device.type
        == "cpu"
    )
