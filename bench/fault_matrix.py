"""Reproduce the fault matrix of docs/reliability.md from the outside, as a user would.

    python bench/fault_matrix.py [--jobs 4] [--only SUBSTRING] [--keep]

Every case drives ``python -m trpo.run`` / ``python -m trpo.evaluate`` in subprocesses with
tiny settings (2 envs × 32 steps, an 8-unit MLP, a few hundred env steps), damages the run
directory the way the row describes, and checks what the program does: exit code, one-line
errors without a traceback, warnings naming the file, and files outside the run left alone.
Test envs (never-ending, NaN, raising, Dict observations, a module that leaves a marker when
imported) live in a module written to a temporary directory and named as ``module:Env-v0``.

Prints one row per case, ``PASS``/``FAIL``, its seconds and, for a failure, why; the exit
code is the number of failures. Cases run ``--jobs`` at a time (about 1–2 minutes on 4 idle
cores). The unit tests with the same names are in tests/test_reliability*.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = (
    "--n-envs 2 --n-steps 32 --hidden-sizes 8 --cg-iters 3 --critic-epochs 1 "
    "--critic-minibatch-size 64 --line-search-max-tries 5 --eval-episodes 0 --no-progress "
    "--no-tensorboard"
).split()
ENV_MODULE = '''
import os
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Faulty(gym.Env):
    """CartPole-like 4-d observations; a fault after `fault_step` steps of this env."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, fault=None, fault_step=60, episode=20, render_mode=None):
        self.fault, self.fault_step, self.episode = fault, fault_step, episode
        self.render_mode, self.steps, self.t = render_mode, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(4, np.float32), {}

    def step(self, action):
        self.steps += 1
        self.t += 1
        obs = np.full(4, 0.1 * (action - 0.5), np.float32)
        if self.steps > self.fault_step and self.fault == "nan":
            obs[0] = np.nan
        if self.steps > self.fault_step and self.fault == "raise":
            raise RuntimeError("simulated env failure")
        ended = self.episode is not None and self.t >= self.episode
        return obs, 1.0, ended, False, {}

    def render(self):
        return np.full((8, 8, 3), 120, np.uint8)


class DictObs(Faulty):
    observation_space = spaces.Dict(
        {"pos": spaces.Box(-1.0, 1.0, (3,), np.float32), "mode": spaces.Discrete(3)}
    )

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"pos": np.zeros(3, np.float32), "mode": 0}, {}

    def step(self, action):
        _, r, term, trunc, info = super().step(action)
        obs = {"pos": np.full(3, 0.1 * action, np.float32), "mode": int(action)}
        return obs, r, term, trunc, info


if os.environ.get("FAULT_MARKER"):
    open(os.environ["FAULT_MARKER"], "a").close()
gym.register("Clean-v0", entry_point=Faulty)
gym.register("Endless-v0", entry_point=Faulty, kwargs={"episode": None})
gym.register("NanObs-v0", entry_point=Faulty, kwargs={"fault": "nan"})
gym.register("Raise-v0", entry_point=Faulty, kwargs={"fault": "raise"})
gym.register("DictObs-v0", entry_point=DictObs)
'''
MOD = "faultenvs"


class Case:
    """A case's scratch directory and subprocess helpers."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.runs = self.dir / "runs"
        self.runs.mkdir(parents=True)
        self.marker = self.dir / "imported"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "FAULT_MARKER": str(self.marker),
        }

    def python(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=self.dir, env=self.env, capture_output=True,
            text=True, timeout=timeout, **kw,
        )

    def train(self, name: str, *flags: str, env_id: str = "CartPole-v1", steps: int = 256,
              **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "trpo.run", "--env-id", env_id, "--total-steps", str(steps),
                           "--runs-root", str(self.runs), "--run-name", name, *FAST, *flags, **kw)

    def resume(self, name: str, *flags: str, **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "trpo.run", "--resume", str(self.runs / name), *flags, **kw)

    def evaluate(self, name: str, *flags: str, **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "trpo.evaluate", str(self.runs / name), *flags, **kw)

    def ckpts(self, name: str) -> list[Path]:
        return sorted((self.runs / name / "checkpoints").glob("ckpt_*.pt"))


def expect(condition: bool, why: str, proc: subprocess.CompletedProcess | None = None) -> None:
    if not condition:
        tail = ""
        if proc is not None:
            tail = f" [rc={proc.returncode}; stderr: {proc.stderr.strip()[-300:]!r}]"
        raise AssertionError(why + tail)


def ok(proc: subprocess.CompletedProcess) -> None:
    expect(proc.returncode == 0, "expected exit code 0", proc)


def one_line_error(proc: subprocess.CompletedProcess, code: int | None = None) -> str:
    """Non-zero exit (``code`` if given), exactly one stderr line, no traceback."""
    expect(proc.returncode != 0 and (code is None or proc.returncode == code),
           f"expected exit code {code or 'non-zero'}", proc)
    expect("Traceback" not in proc.stderr, "a traceback was printed", proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    expect(len(lines) == 1, f"expected one stderr line, got {len(lines)}", proc)
    return lines[0]


def clean_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """Exit code ``code`` and no traceback (the parser's message may span lines)."""
    expect(proc.returncode == code, f"expected exit code {code}", proc)
    expect("Traceback" not in proc.stderr, "a traceback was printed", proc)
    return proc.stderr


def metric_rows(case: Case, name: str) -> list[list[str]]:
    lines = (case.runs / name / "metrics.csv").read_text().splitlines()
    return [ln.split(",") for ln in lines[1:]]


def victim(case: Case) -> Path:
    path = case.dir / "victim.txt"
    path.write_text("original")
    return path


# --- the rows of docs/reliability.md ----------------------------------------------------------
def sigkill_during_training(case: Case) -> None:
    run = case.runs / "r"
    cmd = [sys.executable, "-m", "trpo.run", "--env-id", "CartPole-v1", "--total-steps", "20000",
           "--runs-root", str(case.runs), "--run-name", "r", "--checkpoint-every", "2", *FAST]
    proc = subprocess.Popen(cmd, cwd=case.dir, env=case.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and len(list((run / "checkpoints").glob("ckpt_*.pt"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    expect(len(case.ckpts("r")) >= 1, "no checkpoint before the kill")
    ok(resumed := case.resume("r", "--total-steps", "2560", timeout=300))
    steps = [int(r[0]) for r in metric_rows(case, "r")]
    expect(steps == sorted(set(steps)), f"metric steps repeated or out of order: {steps}", resumed)
    expect(steps[-1] >= 2560, f"the resumed run did not finish: {steps[-1]}")


def corrupted_newest_checkpoint(case: Case) -> None:
    ok(case.train("r", "--checkpoint-every", "1", steps=256))
    newest = case.ckpts("r")[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    ok(p := case.resume("r"))
    expect(f"skipped checkpoint {newest}" in p.stderr, "the corrupted file was not named", p)


def crafted_pickle_checkpoint(case: Case) -> None:
    ok(case.train("r", "--checkpoint-every", "1", steps=256))
    newest = case.ckpts("r")[-1]
    payload = case.dir / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {payload}",))

    data = pickle.dumps({"actor": Exploit()})
    newest.write_bytes(data)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    newest.with_name(newest.name + ".sha256").write_text(json.dumps(record))
    ok(p := case.resume("r"))
    expect(not payload.exists(), "the crafted pickle ran")
    expect(f"skipped checkpoint {newest}" in p.stderr, "the crafted file was not named", p)


def _env_fault(case: Case, env: str, words: str) -> None:
    p = case.train("r", env_id=f"{MOD}:{env}", steps=512)
    expect(p.returncode == 1, "expected exit code 1", p)
    expect(words in p.stderr and "--resume" in p.stderr and "Traceback" not in p.stderr,
           f"the error does not say {words!r} and how to resume", p)
    expect(bool(case.ckpts("r")), "no checkpoint was kept")


def nan_from_env(case: Case) -> None:
    _env_fault(case, "NanObs-v0", "non-finite")


def env_raising_in_step(case: Case) -> None:
    _env_fault(case, "Raise-v0", "raised during step")


def bad_configuration(case: Case) -> None:
    err = clean_error(case.train("r", "--max-kl", "-1"), 2)
    expect("max_kl" in err or "max-kl" in err, f"the field is not named: {err}")
    expect(not (case.runs / "r").exists(), "a run directory was created")


def unknown_env_id(case: Case) -> None:
    p = case.train("r", env_id="CartPol-v1")
    expect(p.returncode == 2 and "CartPole-v1" in p.stderr and "Traceback" not in p.stderr,
           "expected exit 2 suggesting CartPole-v1", p)


def determinism(case: Case) -> None:
    ok(case.train("a", "--seed", "3"))
    ok(case.train("b", "--seed", "3"))
    header = (case.runs / "a" / "metrics.csv").read_text().splitlines()[0].split(",")
    keep = [i for i, k in enumerate(header) if not (k.startswith("time/") or "per_second" in k)]
    rows = [[[r[i] for i in keep] for r in metric_rows(case, n)] for n in ("a", "b")]
    expect(rows[0] == rows[1], "same seed, different learning metrics")


def memory_refusal(case: Case) -> None:
    err = clean_error(case.train("r", "--memory-limit-gb", "0.000001"), 2)
    expect("GiB" in err, f"no estimate in: {err}")


# --- issue 13 rows ---------------------------------------------------------------------------
def symlinked_checkpoint_dir(case: Case) -> None:
    ok(case.train("r", "--checkpoint-every", "1"))
    elsewhere = case.dir / "elsewhere"
    shutil.move(case.runs / "r" / "checkpoints", elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    (case.runs / "r" / "checkpoints").symlink_to(elsewhere)
    line = one_line_error(case.resume("r", "--total-steps", "512"), 2)
    expect("symbolic link" in line, f"not refused as a link: {line}")
    expect(sorted(p.name for p in elsewhere.iterdir()) == before, "files elsewhere changed")


def symlinked_learning_curve(case: Case) -> None:
    ok(case.train("r"))
    target, png = victim(case), case.runs / "r" / "learning_curve.svg"
    png.unlink()
    png.symlink_to(target)
    ok(case.resume("r", "--total-steps", "320"))
    expect(target.read_text() == "original", "the link's target was overwritten")
    expect(not png.is_symlink(), "the link is still there")


def symlinked_eval_gif(case: Case) -> None:
    ok(case.train("r", env_id=f"{MOD}:Clean-v0"))
    target, gif = victim(case), case.runs / "r" / "eval.gif"
    gif.symlink_to(target)
    ok(p := case.evaluate("r", "--allow-import", "--video", "--episodes", "1"))
    expect(target.read_text() == "original", "the link's target was overwritten", p)
    expect(gif.read_bytes()[:6] == b"GIF89a", "no GIF written", p)


def module_id_not_imported_by_evaluate(case: Case) -> None:
    ok(case.train("r", env_id=f"{MOD}:Clean-v0"))  # training may import it: the user named it
    case.marker.unlink()
    line = one_line_error(case.evaluate("r", "--episodes", "1"), 2)
    expect("--allow-import" in line, f"the opt-in flag is not named: {line}")
    expect(not case.marker.exists(), "the module was imported")
    ok(case.evaluate("r", "--episodes", "1", "--allow-import"))
    expect(case.marker.exists(), "--allow-import did not import the module")


def endless_episodes_in_train_eval(case: Case) -> None:
    p = case.train("r", "--eval-episodes", "1", env_id=f"{MOD}:Endless-v0", timeout=240)
    ok(p)
    expect("did not end within 10000 steps" in p.stderr, "no warning about the cap", p)


def endless_episodes_in_evaluate(case: Case) -> None:
    ok(case.train("r", env_id=f"{MOD}:Endless-v0"))
    p = case.evaluate("r", "--allow-import", "--episodes", "2", "--max-episode-steps", "300")
    ok(p)
    expect("mean return 300.0" in p.stdout and "did not end within 300 steps" in p.stderr,
           "not capped at 300 steps with a warning", p)


def fifo_as_newest_checkpoint(case: Case) -> None:
    ok(case.train("r", "--checkpoint-every", "1"))
    newest = case.ckpts("r")[-1]
    newest.unlink()
    os.mkfifo(newest)
    ok(p := case.resume("r", "--total-steps", "320", timeout=120))
    expect(f"skipped checkpoint {newest}" in p.stderr and "FIFO" in p.stderr,
           "the FIFO was not named as skipped", p)


def module_env_id_trains(case: Case) -> None:
    ok(case.train("r", env_id=f"{MOD}:Clean-v0"))
    expect(case.marker.exists(), "the module was not imported")


def file_size_limit_at_first_checkpoint(case: Case) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    p = case.train("r", "--hidden-sizes", "128", "128", "--no-plot", preexec_fn=limit)
    line = one_line_error(p, 2)
    expect("ulimit -f" in line, f"the cause is not named: {line}")
    left = [q.name for q in (case.runs / "r" / "checkpoints").iterdir()]
    expect(left == [], f"leftovers in checkpoints/: {left}")


def _plant_other_envs_checkpoint(case: Case) -> Path:
    ok(case.train("r", "--checkpoint-every", "1"))
    ok(case.train("p", env_id="Pendulum-v1"))
    src = case.ckpts("p")[-1]
    dst = case.runs / "r" / "checkpoints" / "ckpt_000099.pt"
    shutil.copy(src, dst)
    shutil.copy(src.with_name(src.name + ".sha256"), dst.with_name(dst.name + ".sha256"))
    return dst


def other_envs_checkpoint_at_evaluate(case: Case) -> None:
    planted = _plant_other_envs_checkpoint(case)
    ok(p := case.evaluate("r", "--episodes", "1"))
    expect(f"skipped checkpoint {planted}" in p.stderr, "the other env's file was not named", p)


def other_envs_checkpoint_at_resume(case: Case) -> None:
    planted = _plant_other_envs_checkpoint(case)
    ok(p := case.resume("r", "--total-steps", "320"))
    expect(f"skipped checkpoint {planted}" in p.stderr, "the other env's file was not named", p)


def damaged_metrics_csv(case: Case) -> None:
    ok(case.train("r", "--checkpoint-every", "1"))
    csv = case.runs / "r" / "metrics.csv"
    lines = csv.read_bytes().split(b"\n")
    lines[2] = b"\xff\xfe garbage"
    csv.write_bytes(b"\n".join(lines))
    ok(p := case.resume("r", "--total-steps", "320"))
    expect("dropped 1 unreadable row(s)" in p.stderr, "no warning naming the dropped row", p)
    expect((case.runs / "r" / "metrics.csv.damaged").exists(), "the original was not kept")


def unwritable_metrics_csv(case: Case) -> None:
    ok(case.train("r"))
    csv = case.runs / "r" / "metrics.csv"
    csv.unlink()
    csv.mkdir()  # works as root too, unlike chmod
    line = one_line_error(case.resume("r", "--total-steps", "320"))
    expect("metrics.csv" in line, f"the file is not named: {line}")


def evaluate_errors(case: Case) -> None:
    ok(case.train("r"))
    (case.dir / "empty").mkdir()
    for args, words in [
        ((str(case.dir / "missing"),), "not a directory"),
        ((str(case.dir / "empty"),), "config.json"),
        ((str(case.runs / "r"), "--episodes", "0"), ">= 1"),
        ((str(case.runs / "r"), "--no-such-flag"), "unrecognized"),
    ]:
        line = one_line_error(case.python("-m", "trpo.evaluate", *args), 2)
        expect(words in line, f"{args}: {line}")
    for p in (case.runs / "r" / "checkpoints").iterdir():
        p.unlink()
    line = one_line_error(case.evaluate("r"), 2)
    expect("no checkpoint" in line, line)


def dict_observations(case: Case) -> None:
    ok(p := case.train("r", env_id=f"{MOD}:DictObs-v0"))
    expect("FlattenObservation" in p.stderr, "no flattening notice", p)
    ok(case.evaluate("r", "--allow-import", "--episodes", "1"))


CASES: dict[str, Callable[[Case], None]] = {
    f.__name__: f
    for f in (
        sigkill_during_training, corrupted_newest_checkpoint, crafted_pickle_checkpoint,
        nan_from_env, env_raising_in_step, bad_configuration, unknown_env_id, determinism,
        memory_refusal, symlinked_checkpoint_dir, symlinked_learning_curve, symlinked_eval_gif,
        module_id_not_imported_by_evaluate, endless_episodes_in_train_eval,
        endless_episodes_in_evaluate, fifo_as_newest_checkpoint, module_env_id_trains,
        file_size_limit_at_first_checkpoint, other_envs_checkpoint_at_evaluate,
        other_envs_checkpoint_at_resume, damaged_metrics_csv, unwritable_metrics_csv,
        evaluate_errors, dict_observations,
    )
}


def run_case(root: Path, name: str) -> tuple[str, bool, float, str]:
    start = time.perf_counter()
    try:
        CASES[name](Case(root, name))
        return name, True, time.perf_counter() - start, ""
    except (AssertionError, subprocess.TimeoutExpired, OSError) as e:
        return name, False, time.perf_counter() - start, f"{type(e).__name__}: {e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="cases run at once")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    names = [n for n in CASES if args.only in n]
    root = Path(tempfile.mkdtemp(prefix="fault_matrix_"))
    (root / f"{MOD}.py").write_text(textwrap.dedent(ENV_MODULE))
    start, failures = time.perf_counter(), 0
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for name, passed, seconds, why in pool.map(lambda n: run_case(root, n), names):
                failures += not passed
                print(f"{'PASS' if passed else 'FAIL'}  {name:<40} {seconds:6.1f} s  {why}",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{len(names) - failures}/{len(names)} passed in {time.perf_counter() - start:.0f} s"
          + (f" (scratch: {root})" if args.keep else ""))
    return failures


if __name__ == "__main__":
    sys.exit(main())
