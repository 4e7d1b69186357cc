"""Data-parallel TRPO: natgrad.distributed, trpo.distributed and the torchrun entry point.

The exactness tests run two gloo ranks on loopback (``torch.multiprocessing`` spawn, a file
store), each holding a shard of a fixed float64 batch, and compare what they compute with
one process on the whole batch (the reference, computed here without any process group):
equal and unequal (60/40) shards, policy step, critic fit, normaliser merge, advantage
normalisation, gathering, broadcast, the divergence check. One spawn runs every case, to
pay the start-up of two interpreters once. The end-to-end tests launch ``trpo.run`` as real
processes: a 2-rank CartPole run through torchrun, and a rank killed mid-run, the survivor
exiting with a clear error, and the run resumed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from natgrad import distributed as nd
from natgrad.linop import LinearOperator
from trpo.checkpoint import list_checkpoints
from trpo.config import TRPOConfig
from trpo.critic import CriticSettings, explained_variance, fit_critic, supports_fast_fit
from trpo.distributed import SINGLE_PROCESS, DataParallel, SyncedRunningMeanStd
from trpo.gae import LOCAL, normalize_advantages
from trpo.logger import read_metrics
from trpo.normalize import RunningMeanStd
from trpo.policy import kl_divergence, make_actor, make_critic
from trpo.train import _agree_on_run_dir
from trpo.update import PolicyBatch, PolicyStepSettings, policy_step

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float64
B = 50
SPLITS = {"equal": (25, 25), "unequal": (30, 20)}  # the second: 60/40
STEP_KW = dict(max_kl=0.02, cg_iters=8, cg_damping=0.05, line_search_max_tries=10)
POLICY_CASES = {  # name -> (obs space, action space, extra policy_step kwargs)
    "gaussian": (gym.spaces.Box(-1, 1, (5,)), gym.spaces.Box(-1, 1, (2,)), {}),
    "categorical": (gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(3), {"cg_rtol": 1e-3}),
    # invalid actions masked (PolicyBatch.masks): the masks are sharded with the states
    "masked": (gym.spaces.Box(-1, 1, (4,)), gym.spaces.MultiDiscrete([3, 2]), {}),
}
CRITIC_CASES = {  # name -> (minibatch size, amsgrad: the fused flat fit or the autograd loop)
    "full_batch": (10_000, False),
    "minibatches": (16, False),
    "minibatches_autograd": (16, True),
}
CRITIC_EPOCHS = 3


def _policy_batch(name: str) -> tuple[torch.nn.Module, PolicyBatch]:
    obs_space, act_space, _ = POLICY_CASES[name]
    torch.manual_seed(0)
    actor = make_actor(obs_space, act_space, (16,)).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(B, obs_space.shape[0], generator=g, dtype=DTYPE)
    masks = None
    if isinstance(act_space, gym.spaces.Discrete):
        actions = torch.randint(act_space.n, (B,), generator=g)
    elif isinstance(act_space, gym.spaces.MultiDiscrete):
        masks = torch.rand(B, 5, generator=g) < 0.6
        masks[:, 0] = masks[:, 3] = True  # every head keeps a valid action
        score = torch.rand(B, 5, generator=g) * masks  # the actions: valid ones
        actions = torch.stack([score[:, :3].argmax(-1), score[:, 3:].argmax(-1)], -1)
    else:
        actions = torch.randn(B, act_space.shape[0], generator=g, dtype=DTYPE)
    advantages = torch.randn(B, generator=g, dtype=DTYPE)
    return actor, PolicyBatch(obs=obs, actions=actions, advantages=advantages, masks=masks)


def _critic_data(
    amsgrad: bool = False,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    critic = make_critic(gym.spaces.Box(-1, 1, (5,)), (16,)).to(DTYPE)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2, amsgrad=amsgrad)
    assert supports_fast_fit(critic, opt, torch.zeros(1, 5, dtype=DTYPE)) != amsgrad
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(B, 5, generator=g, dtype=DTYPE)
    returns = torch.randn(B, generator=g, dtype=DTYPE) * 3 + 1
    return critic, opt, obs, returns


def _shard(x: torch.Tensor | None, split: tuple[int, ...], rank: int) -> torch.Tensor | None:
    start = sum(split[:rank])
    return None if x is None else x[start : start + split[rank]]  # None: PolicyBatch.masks


def _stats_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    return torch.randn(B, 3, generator=g, dtype=DTYPE) * torch.tensor([1.0, 10.0, 0.1]) + 5


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ------------------------------------------------------------------ the spawned ranks
def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """One rank: run every case on its shard, save what it computed for the parent.

    The rank's stderr goes to ``rank{rank}.stderr`` so that a crash in C++ (a signal, no
    Python traceback) still leaves its message for the fixture to report.
    """
    log = open(Path(out_dir) / f"rank{rank}.stderr", "w")  # noqa: SIM115 (held to the exit)
    os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    dp = DataParallel(rank=rank, world_size=world)
    out: dict[str, object] = {}
    try:
        for split_name, split in SPLITS.items():
            for name, (_, _, extra) in POLICY_CASES.items():
                actor, batch = _policy_batch(name)
                shard = PolicyBatch(*(_shard(t, split, rank) for t in dataclasses.astuple(batch)))
                settings = PolicyStepSettings(**STEP_KW, **extra)
                result = policy_step(actor, shard, settings, reducer=dp.reducer)
                out[f"policy/{name}/{split_name}"] = (_flat(actor), result)
            for name, (mb, amsgrad) in CRITIC_CASES.items():
                critic, opt, obs, returns = _critic_data(amsgrad)
                gen = torch.Generator().manual_seed(100 + rank)
                fit = fit_critic(
                    critic,
                    opt,
                    _shard(obs, split, rank),
                    _shard(returns, split, rank),
                    CriticSettings(epochs=CRITIC_EPOCHS, minibatch_size=mb),
                    generator=gen,
                    reducer=dp.reducer,
                )
                out[f"critic/{name}/{split_name}"] = (_flat(critic), fit)
            data = _stats_data()
            rms = SyncedRunningMeanStd(RunningMeanStd((3,)))
            rms.update(data[:7])  # the same prior data on every rank: merged twice
            rms.update(_shard(data, split, rank))
            out[f"rms/{split_name}"] = rms.state_dict()
            _, batch = _policy_batch("gaussian")
            adv = _shard(batch.advantages * 4 + 2, split, rank)
            values = _shard(batch.obs[:, 0], split, rank)
            out[f"adv/{split_name}"] = normalize_advantages(adv, reducer=dp.reducer)
            out[f"ev/{split_name}"] = explained_variance(values, adv, dp.reducer)
        # A rank with an empty batch still takes part in the merge.
        rms = SyncedRunningMeanStd(RunningMeanStd((3,)))
        rms.update(_stats_data()[:0] if rank == 1 else _stats_data())
        out["rms/empty_rank"] = rms.state_dict()
        # Rows of different lengths (none on rank 1) come back in rank order.
        rows = torch.arange(6 * (1 - rank), dtype=DTYPE).reshape(-1, 2) + 100 * rank
        out["gather"] = nd.all_gather_rows(rows)
        # The operator wrapper on blocks: Σ_r w_r A_r.
        a = torch.full((3, 3), float(rank + 1), dtype=DTYPE) + torch.eye(3, dtype=DTYPE)
        w = nd.sample_weight(3 if rank == 0 else 1)
        out["operator"] = nd.all_reduce_operator(LinearOperator.from_matrix(a), weight=w).to_dense()
        reducer = nd.Reducer()
        out["function"] = reducer.mean(torch.tensor(2.0 * (rank + 1), dtype=DTYPE), w)
        out["reducer"] = (
            reducer.weight(3 if rank == 0 else 1),
            float(reducer.sum(torch.tensor(rank + 1.0, dtype=DTYPE))),
            reducer.all(True),
            reducer.all(rank == 0),
        )
        p = torch.zeros(2, dtype=DTYPE, requires_grad=True)
        (p * torch.tensor([1.0, 3.0 * rank], dtype=DTYPE)).sum().backward()
        nd.average_gradients([p])  # the plain average: weights 1/2
        out["grad"] = p.grad
        # Broadcast: every rank ends with rank 0's parameters.
        torch.manual_seed(10 + rank)
        net = make_critic(gym.spaces.Box(-1, 1, (3,)), (4,)).to(DTYPE)
        dp.broadcast_modules(net)
        out["broadcast"] = _flat(net)
        dp.check_agreement(net, net)  # agreeing: no error
        with torch.no_grad():  # one bit of one parameter differs on rank 1
            if rank == 1:
                p = next(net.parameters())
                p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(math.inf, dtype=DTYPE))
        try:
            dp.check_agreement(net, net)
            out["divergence"] = None
        except nd.DivergenceError as e:
            out["divergence"] = str(e)
        # Rank 0 creates a new run's directory; every rank gets its name, or its refusal.
        runs = str(Path(out_dir) / "runs")
        claimed = TRPOConfig(runs_root=runs, run_name="claimed")
        out["runs_root"] = runs
        out["run_name"] = _agree_on_run_dir(claimed, dp).run_name
        try:
            _agree_on_run_dir(claimed, dp)
            out["run_dir_error"] = None
        except ValueError as e:
            out["run_dir_error"] = str(e)
        out["default_run_name"] = _agree_on_run_dir(TRPOConfig(runs_root=runs), dp).run_name
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _rank_logs(out_dir: Path) -> str:
    return "\n".join(
        f"--- rank {r} stderr:\n{(out_dir / f'rank{r}.stderr').read_text()[-3000:]}"
        for r in range(2)
        if (out_dir / f"rank{r}.stderr").exists()
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks computed (one spawn for every exactness test).

    A rank killed by a signal is spawned once more, in a fresh directory: gloo's TCP
    transport can abort a process while the pairs connect (SIGABRT thrown from its listener
    thread, pytorch/pytorch#188266), which says nothing about the code under test. A Python
    exception in a rank, or a second signal, fails every test with both ranks' stderr.
    """
    for attempt in range(2):
        out = tmp_path_factory.mktemp(f"ranks{attempt}")
        try:
            mp.spawn(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
            return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt == 1:
                raise RuntimeError(f"{e}\n{_rank_logs(out)}") from e
            print(
                f"rank {e.error_index} died of {e.signal_name}; spawning again\n{_rank_logs(out)}"
            )
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"{e}\n{_rank_logs(out)}") from e
    raise AssertionError("unreachable")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------- exactness tests
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", POLICY_CASES)
def test_policy_step_on_two_shards_equals_one_process_on_the_batch(ranks, name, split):
    actor, batch = _policy_batch(name)
    theta_old = _flat(actor)
    ref = policy_step(actor, batch, PolicyStepSettings(**STEP_KW, **POLICY_CASES[name][2]))
    assert ref.applied and ref.cg_iterations > 0  # a real step, not a no-op
    for rank in ranks:
        theta, res = rank[f"policy/{name}/{split}"]
        assert _rel(theta - theta_old, _flat(actor) - theta_old) <= 1e-8
        assert res.applied and res.status == ref.status
        assert (res.cg_iterations, res.line_search_tries) == (
            ref.cg_iterations,
            ref.line_search_tries,
        )
        for field in ("kl", "surrogate_improvement", "expected_improvement", "grad_norm"):
            assert math.isclose(getattr(res, field), getattr(ref, field), rel_tol=1e-8), field
        assert math.isclose(res.entropy, ref.entropy, rel_tol=1e-10)
    # The ranks hold bit-identical parameters (nothing but all-reduced data decided them).
    assert torch.equal(ranks[0][f"policy/{name}/{split}"][0], ranks[1][f"policy/{name}/{split}"][0])


def test_a_wrongly_weighted_mean_would_be_caught(ranks):
    """The check has teeth: averaging the 60/40 shards' means with 1/2 each moves the step."""
    actor, batch = _policy_batch("gaussian")
    theta_old = _flat(actor)
    policy_step(actor, batch, PolicyStepSettings(**STEP_KW))
    ref = _flat(actor) - theta_old
    half = dataclasses.replace(batch, advantages=batch.advantages.clone())
    half.advantages[:30] *= 25 / 30  # = mean_a/2 + mean_b/2 instead of the global mean
    half.advantages[30:] *= 25 / 20
    actor, _ = _policy_batch("gaussian")
    policy_step(actor, half, PolicyStepSettings(**STEP_KW))
    assert _rel(_flat(actor) - theta_old, ref) > 1e-3


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", CRITIC_CASES)
def test_critic_fit_on_two_shards_equals_one_process(ranks, name, split):
    """Minibatch k of the global fit is the union of each rank's k-th piece of its shuffled
    shard (``fit_critic(reducer=Reducer())``); replayed here in one process with the same
    per-rank shuffles. With a minibatch ≥ the batch that is plain full-batch ``fit_critic``."""
    mb, amsgrad = CRITIC_CASES[name]
    critic, opt, obs, returns = _critic_data(amsgrad)
    if mb >= B:  # the single-process fit itself
        ref_fit = fit_critic(
            critic,
            opt,
            obs,
            returns,
            CriticSettings(epochs=CRITIC_EPOCHS, minibatch_size=mb),
            generator=torch.Generator().manual_seed(0),
        )
        ref_loss, ref_steps = ref_fit.value_loss, ref_fit.steps
    else:  # an independent replay of the semantics
        gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
        k = math.ceil(B / mb)
        offsets = [0, SPLITS[split][0]]
        for _ in range(CRITIC_EPOCHS):
            pieces = [
                torch.tensor_split(torch.randperm(n, generator=g) + off, k)
                for n, g, off in zip(SPLITS[split], gens, offsets)
            ]
            total = 0.0
            for j in range(k):
                idx = torch.cat([p[j] for p in pieces])
                loss = (critic(obs[idx]) - returns[idx]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
        ref_loss, ref_steps = total / B, CRITIC_EPOCHS * k
    for rank in ranks:
        theta, fit = rank[f"critic/{name}/{split}"]
        assert _rel(theta, _flat(critic)) <= 1e-8
        assert fit.steps == ref_steps
        assert math.isclose(fit.value_loss, ref_loss, rel_tol=1e-8)
    assert torch.equal(ranks[0][f"critic/{name}/{split}"][0], ranks[1][f"critic/{name}/{split}"][0])


@pytest.mark.parametrize("split", SPLITS)
def test_normaliser_statistics_merge_like_one_process(ranks, split):
    data = _stats_data()
    ref = RunningMeanStd((3,))
    ref.update(data[:7])
    ref.update(data[:7])
    ref.update(data)
    for rank in ranks:
        got = rank[f"rms/{split}"]
        assert float(got["count"]) == float(ref.count) == B + 14
        torch.testing.assert_close(got["mean"], ref.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(got["var"], ref.var, rtol=1e-12, atol=0)


def test_a_rank_with_an_empty_batch_still_merges(ranks):
    ref = RunningMeanStd((3,))
    ref.update(_stats_data())
    for rank in ranks:
        torch.testing.assert_close(rank["rms/empty_rank"]["var"], ref.var, rtol=1e-12, atol=0)
        assert float(rank["rms/empty_rank"]["count"]) == B


@pytest.mark.parametrize("split", SPLITS)
def test_advantages_and_explained_variance_use_global_statistics(ranks, split):
    _, batch = _policy_batch("gaussian")
    adv = batch.advantages * 4 + 2
    ref = normalize_advantages(adv)
    got = torch.cat([ranks[r][f"adv/{split}"] for r in range(2)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    ev = explained_variance(batch.obs[:, 0], adv)
    for rank in ranks:
        assert math.isclose(rank[f"ev/{split}"], ev, rel_tol=1e-10)


def test_rank_0_alone_creates_the_run_directory_and_shares_its_name_or_error(ranks):
    runs = Path(ranks[0]["runs_root"])
    names = {r["default_run_name"] for r in ranks}
    assert len(names) == 1  # rank 0's timestamp for every rank
    assert sorted(p.name for p in runs.iterdir()) == sorted(["claimed", *names])
    for rank in ranks:
        assert rank["run_name"] == "claimed"
        assert rank["run_dir_error"].startswith(f"run directory {runs / 'claimed'} already")
        assert "--resume" in rank["run_dir_error"]


def test_gather_operator_broadcast_and_divergence(ranks):
    expected_rows = torch.arange(6, dtype=DTYPE).reshape(3, 2)
    a0 = torch.ones(3, 3, dtype=DTYPE) + torch.eye(3, dtype=DTYPE)
    a1 = torch.full((3, 3), 2.0, dtype=DTYPE) + torch.eye(3, dtype=DTYPE)
    for rank in ranks:
        assert torch.equal(rank["gather"], expected_rows)
        torch.testing.assert_close(rank["operator"], 0.75 * a0 + 0.25 * a1, rtol=1e-15, atol=0)
        assert float(rank["function"]) == 0.75 * 2 + 0.25 * 4
        assert rank["reducer"] == (0.75 if rank is ranks[0] else 0.25, 3.0, True, False)
        assert rank["grad"].tolist() == [1.0, 1.5]
        assert "rank(s) [1]" in rank["divergence"]  # every rank raised, naming rank 1
    torch.manual_seed(10)
    net0 = make_critic(gym.spaces.Box(-1, 1, (3,)), (4,)).to(DTYPE)
    assert torch.equal(ranks[1]["broadcast"], _flat(net0))
    assert torch.equal(ranks[0]["broadcast"], _flat(net0))


# ----------------------------------------------------------- single-process no-ops
def test_helpers_are_no_ops_without_a_process_group():
    assert not dist.is_initialized() and not nd.is_distributed()
    x = torch.randn(4, dtype=DTYPE)
    assert nd.all_reduce_mean(x, weight=0.3) is x and nd.all_reduce_sum(x) is x
    assert nd.sample_weight(7) == 1.0 and nd.get_world_size() == 1 and nd.get_rank() == 0
    op = LinearOperator.from_matrix(torch.eye(4, dtype=DTYPE))
    assert nd.all_reduce_operator(op) is op
    for reducer in (nd.LOCAL, nd.Reducer()):  # the identity in one process
        assert not reducer.active and reducer.weight(7) == 1.0
        assert reducer.mean(x, 0.3) is x and reducer.sum(x) is x
        assert reducer.operator(op, 0.3) is op and reducer.all(True) and not reducer.all(False)
    assert nd.all_gather_rows(x) is x
    mean, var, n = nd.merge_moments(x, x.abs(), 3)
    assert mean is x and n == 3.0
    assert not nd.init_from_env()  # WORLD_SIZE unset: nothing to join
    assert DataParallel.from_env() is SINGLE_PROCESS
    with pytest.raises(ValueError, match="n_local"):
        nd.sample_weight(-1)
    with pytest.raises(ValueError, match="op"):
        nd.all_reduce_operator(torch.eye(2))  # type: ignore[arg-type]


def test_rank_seeds_differ_and_are_reproducible():
    gens = [torch.Generator() for _ in range(2)]
    dp0, dp1 = DataParallel(rank=0, world_size=2), DataParallel(rank=1, world_size=2)
    dp1.reseed(5, 3, *gens)
    first = [g.initial_seed() for g in gens]
    dp1.reseed(5, 3, *gens)
    assert [g.initial_seed() for g in gens] == first and first[0] != first[1]
    dp0.reseed(5, 3, *gens)
    assert [g.initial_seed() for g in gens] != first
    assert dp0.env_seed(5) == 5 != dp1.env_seed(5)
    g = torch.Generator().manual_seed(9)
    SINGLE_PROCESS.reseed(5, 3, g)  # one process keeps its running generator
    assert g.initial_seed() == 9


def test_num_updates_and_reducer_of_one_and_two_ranks():
    assert SINGLE_PROCESS.num_updates(100_000, 1024) == 98  # ceil(100000 / 1024)
    assert SINGLE_PROCESS.num_updates(30, 10) == 3
    assert DataParallel(rank=0, world_size=2).num_updates(100_000, 1024) == 49  # 2048 a step
    assert SINGLE_PROCESS.reducer is LOCAL
    assert DataParallel(rank=1, world_size=2).reducer is not LOCAL


def test_timeout_env_is_validated(monkeypatch):
    from trpo.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, timeout_from_env

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_from_env() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout_from_env() == 12.5
    monkeypatch.setenv(TIMEOUT_ENV, "-1")
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        timeout_from_env()


# --------------------------------------------------------------- end to end (processes)
N_ENVS, N_STEPS = 2, 64
GLOBAL_BATCH = 2 * N_ENVS * N_STEPS
FLAGS = (
    f"--env-id CartPole-v1 --n-envs {N_ENVS} --n-steps {N_STEPS} --hidden-sizes 8 "
    "--cg-iters 3 --critic-epochs 1 --eval-episodes 0 --no-progress --no-tensorboard "
    "--no-plot --checkpoint-every 1"
).split()


def _newest(run_dir: Path) -> int:
    return max((u for u, _ in list_checkpoints(run_dir)), default=-1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _torchrun(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "trpo.run",
        *args,
    ]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_killed_rank_stops_the_other_and_torchrun_resumes_with_one_set_of_artifacts(tmp_path):
    """Phase 1: a fresh 2-rank CartPole run, the ranks started with the variables torchrun
    sets (by hand, so that torchrun's agent does not itself tear the survivor down), without
    a run name (each rank would stamp its own; rank 0's is used). Rank 1 is SIGKILLed after
    two checkpoints: rank 0 must exit non-zero at once, saying how to resume. Phase 2:
    ``torchrun --nproc-per-node 2 -m trpo.run --resume RUN_DIR`` completes two more updates
    into the same single set of artifacts. (Two phases in one test: each start of two
    interpreters costs seconds.)"""
    port = _free_port()
    args = [*FLAGS, "--total-steps", "10000000", "--runs-root", str(tmp_path)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trpo.run", *args],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                TRPO_DIST_TIMEOUT="60",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not any(_newest(d) >= 2 for d in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "no checkpoint written"
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=30)  # well before the 60 s collective timeout
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    (run_dir,) = tmp_path.iterdir()  # one run directory, whatever each rank's clock said
    assert procs[0].returncode != 0 and waited < 30
    assert "rank 0 of 2" in err and f"--resume {run_dir}" in err, err[-3000:]

    last = _newest(run_dir)
    proc = _torchrun(["--resume", str(run_dir), "--total-steps", str((last + 2) * GLOBAL_BATCH)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.csv", "checkpoints"}
    assert _newest(run_dir) == last + 2
    state = torch.load(dict(list_checkpoints(run_dir))[last + 2], weights_only=False)
    assert state["world_size"] == 2 and state["global_step"] == (last + 2) * GLOBAL_BATCH
    metrics = read_metrics(run_dir / "metrics.csv")
    # total_steps counts both ranks' steps: one row per update of 2 × 128 transitions, the
    # rows of the killed run up to its checkpoint kept, none repeated.
    assert metrics["global_step"] == [GLOBAL_BATCH * u for u in range(1, last + 3)]
    # Gathered from both ranks. Only the first updates surely end episodes: once the policy
    # balances, an update of 128 steps per rank can end none (a loaded machine trains longer
    # before the kill, which made an all-rows check flaky).
    assert all(n > 0 for n in metrics["charts/episodes"][:2])


def test_kl_of_the_distributed_step_is_within_the_trust_region(ranks):
    """The accepted step respects max_kl on the whole batch (not only on a shard)."""
    actor, batch = _policy_batch("gaussian")
    with torch.no_grad():
        old = actor.functional_dist_params(dict(actor.named_parameters()), batch.obs)
        old = tuple(t.clone() for t in old)
        theta, _ = ranks[0]["policy/gaussian/unequal"]
        torch.nn.utils.vector_to_parameters(theta, actor.parameters())
        new = actor.functional_dist_params(dict(actor.named_parameters()), batch.obs)
        kl = kl_divergence(actor.family, old, new).mean()
    assert 0 < float(kl) <= STEP_KW["max_kl"]
