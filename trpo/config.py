"""Every TRPO hyperparameter in one dataclass, per-env presets, and the CLI built from them.

Three layers decide a value, lowest first:

1. the dataclass defaults of :class:`TRPOConfig` (a generic setting that learns CartPole-v1),
2. the preset of the chosen env in :data:`PRESETS` (applied by :func:`config_for`),
3. explicit overrides: keyword arguments of :func:`config_for`, or the flags a user typed
   on the command line (:func:`parse_cli`). When resuming (``--resume RUN_DIR``) the run's
   saved ``config.json`` replaces layers 1-2, so a resumed run keeps its own settings.

The config is frozen: derive variants with ``dataclasses.replace(config, field=value)``;
every construction re-runs :meth:`TRPOConfig.validate`, so an invalid field is reported by
name before any env is created.

Example:
    >>> from trpo.config import TRPOConfig, config_for
    >>> config_for("Hopper-v5").cg_iters
    25
    >>> config_for("Hopper-v5", max_kl=0.02).max_kl
    0.02
    >>> TRPOConfig(max_kl=0.0)
    Traceback (most recent call last):
    ...
    ValueError: max_kl must be a finite number > 0 (got 0.0)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import tyro

__all__ = [
    "CONFIG_FILENAME",
    "PRESETS",
    "MemoryBudgetError",
    "TRPOConfig",
    "available_memory_bytes",
    "check_env_id",
    "check_memory",
    "config_for",
    "default_run_name",
    "estimate_rollout_bytes",
    "load_config",
    "parse_cli",
    "save_config",
]

CONFIG_FILENAME = "config.json"
"""Name of the resolved config saved in every run directory."""

_DEVICE_RE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._=+-]+$")
_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TRPOConfig:
    """TRPO (Schulman et al. 2015) with GAE, a CG natural step and a backtracking line search."""

    # --- experiment -------------------------------------------------------------------------
    env_id: Annotated[str, tyro.conf.arg(aliases=("--env",))] = "CartPole-v1"
    """Gymnasium environment id (gymnasium.pprint_registry() lists them)."""
    total_steps: int = 100_000
    """Environment steps to train for, summed over envs (the last update may overshoot)."""
    seed: int = 1
    """Seed of the envs, networks and samplers; same seed and config = same run on CPU."""

    # --- rollout ----------------------------------------------------------------------------
    n_envs: int = 2
    """Parallel environments in the vector env."""
    n_steps: int = 512
    """Steps per env per update; one update uses a batch of n_envs * n_steps transitions."""
    async_envs: bool = False
    """Run the envs in subprocesses (gymnasium AsyncVectorEnv) instead of in this process."""

    # --- networks ---------------------------------------------------------------------------
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the actor and of the critic MLP (tanh); empty = linear."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the diagonal Gaussian policy (Box actions only)."""

    # --- returns and advantages -------------------------------------------------------------
    gamma: float = 0.99
    """Discount factor γ in (0, 1]."""
    gae_lambda: float = 0.95
    """GAE λ in [0, 1]: 0 = one-step TD advantage, 1 = Monte-Carlo return minus V."""
    normalize_advantages: bool = True
    """Standardise the advantages of each batch to mean 0, std 1 before the policy step."""

    # --- trust region (natural step + line search) ------------------------------------------
    max_kl: float = 0.01
    """Trust-region radius δ: bound on the mean KL(π_old‖π_new) over the batch states."""
    cg_iters: int = 15
    """Conjugate-gradient iterations for s ≈ (H + λI)⁻¹ g (the maximum, when cg_rtol > 0)."""
    cg_damping: float = 0.1
    """Damping λ ≥ 0 added to the Fisher in CG: solves (H + λI) s = g."""
    cg_rtol: float = 0.0
    """CG stops at ‖r‖ ≤ rtol·‖g‖; 0 = always run cg_iters (no host sync on GPU)."""
    fvp_fraction: float = 1.0
    """Fraction in (0, 1] of the batch states used for Fisher-vector products (paper: 0.1-0.2)."""
    line_search_shrink: float = 0.8
    """Backtracking factor in (0, 1): candidate k is θ_old + shrinkᵏ·Δθ."""
    line_search_max_tries: int = 10
    """Candidates tried before the step is rejected (then θ stays θ_old)."""
    line_search_accept_ratio: float = 0.0
    """Accept a candidate only if its gain ≥ ratio × expected gain (0 = any gain > 0)."""

    # --- critic -----------------------------------------------------------------------------
    critic_lr: float = 1e-3
    """Adam learning rate of the critic."""
    critic_epochs: int = 10
    """Passes of the critic over the batch per update."""
    critic_minibatch_size: int = 128
    """Critic minibatch size (clipped to the batch size)."""

    # --- normalisation ----------------------------------------------------------------------
    normalize_obs: bool = False
    """Running mean/std observation normalisation (saved with the model, frozen in evaluation)."""
    normalize_reward: bool = False
    """Scale rewards by a running std of the discounted return (as SB3 VecNormalize)."""
    obs_clip: float = 10.0
    """Clip normalised observations to [-obs_clip, obs_clip]."""
    reward_clip: float = 10.0
    """Clip scaled rewards to [-reward_clip, reward_clip]."""

    # --- evaluation, logging, checkpoints ---------------------------------------------------
    eval_episodes: int = 10
    """Deterministic evaluation episodes after training (0 = skip)."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many updates (and always after the last one)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept in RUN_DIR/checkpoints; older ones are deleted."""
    log_every: int = 1
    """Write the metrics row every this many updates."""
    runs_root: str = "runs"
    """Directory under which run directories are created."""
    run_name: str | None = None
    """Run directory name under runs_root; None = '<env_id>__<seed>__<timestamp>'."""
    resume: str | None = None
    """Run directory to continue from its newest valid checkpoint (its config.json is the base)."""
    tensorboard: bool = True
    """Also write TensorBoard events (only if the tensorboard package is installed)."""
    plot: bool = True
    """Save a learning-curve PNG in the run directory at the end."""
    progress: bool = True
    """Show a progress bar (only on an interactive terminal)."""

    # --- system and reliability -------------------------------------------------------------
    device: str = "cpu"
    """Torch device: 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (cuda if available)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating-point dtype of the networks and of the update."""
    cuda_graph: bool = False
    """On CUDA, record the policy step and the critic fit as CUDA graphs and replay them (needs
    cg_rtol = 0 and fvp_fraction = 1; falls back to eager with a warning). No effect on CPU."""
    torch_threads: int = 1
    """torch.set_num_threads value; 0 = leave torch's default. One thread is fastest for the
    small MLPs of classic control and MuJoCo (measured: 5× faster than 2 threads on a loaded
    2-core machine); raise it for large networks or batches."""
    max_consecutive_failures: int = 3
    """Stop (after saving the last good state) when this many updates in a row were rejected
    as non-finite."""
    memory_limit_gb: float | None = None
    """Memory budget in GiB for rollout and update buffers; None = what the OS reports free."""

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; called on construction.

        Raises:
            ValueError: naming the first invalid field, its constraint and its value.
        """
        _check_str(self, "env_id")
        for name in (
            "total_steps",
            "n_envs",
            "n_steps",
            "cg_iters",
            "line_search_max_tries",
            "critic_epochs",
            "critic_minibatch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "max_consecutive_failures",
        ):
            _check_int(self, name, minimum=1)
        for name in ("seed", "eval_episodes", "torch_threads"):
            _check_int(self, name, minimum=0)
        _check_real(self, "max_kl", low=0.0, low_open=True)
        _check_real(self, "gamma", low=0.0, high=1.0, low_open=True)
        _check_real(self, "gae_lambda", low=0.0, high=1.0)
        _check_real(self, "cg_damping", low=0.0)
        _check_real(self, "cg_rtol", low=0.0)
        _check_real(self, "fvp_fraction", low=0.0, high=1.0, low_open=True)
        _check_real(self, "line_search_shrink", low=0.0, high=1.0, low_open=True, high_open=True)
        _check_real(self, "line_search_accept_ratio", low=0.0)
        _check_real(self, "critic_lr", low=0.0, low_open=True)
        _check_real(self, "obs_clip", low=0.0, low_open=True)
        _check_real(self, "reward_clip", low=0.0, low_open=True)
        _check_real(self, "log_std_init")
        for name in (
            "async_envs",
            "normalize_advantages",
            "normalize_obs",
            "normalize_reward",
            "tensorboard",
            "plot",
            "progress",
            "cuda_graph",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (got {getattr(self, name)!r})")
        if not isinstance(self.hidden_sizes, tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in self.hidden_sizes
        ):
            raise ValueError(
                f"hidden_sizes must be a tuple of positive ints (got {self.hidden_sizes!r})"
            )
        _check_str(self, "runs_root")
        if self.run_name is not None and (
            not isinstance(self.run_name, str) or not _RUN_NAME_RE.match(self.run_name)
        ):
            raise ValueError(
                "run_name must be None or a non-empty name of letters, digits and ._=+- "
                f"(no path separators) (got {self.run_name!r})"
            )
        if self.resume is not None:
            _check_str(self, "resume")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (got {self.device!r})"
            )
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64' (got {self.dtype!r})")
        if self.memory_limit_gb is not None:
            _check_real(self, "memory_limit_gb", low=0.0, low_open=True)

    # ----------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Transitions per update: ``n_envs * n_steps``."""
        return self.n_envs * self.n_steps

    @property
    def num_updates(self) -> int:
        """Updates needed to reach ``total_steps``: ``ceil(total_steps / batch_size)``."""
        return -(-self.total_steps // self.batch_size)

    @property
    def run_dir(self) -> Path:
        """The run directory: ``resume`` when resuming, else ``runs_root / run_name``.

        Raises:
            ValueError: if neither ``resume`` nor ``run_name`` is set (call :meth:`resolved`).
        """
        if self.resume is not None:
            return Path(self.resume)
        if self.run_name is None:
            raise ValueError("run_name is None: call config.resolved() to name the run first")
        return Path(self.runs_root) / self.run_name

    def resolved(self, now: _dt.datetime | None = None) -> TRPOConfig:
        """This config with ``run_name`` filled in (see :func:`default_run_name`); idempotent."""
        if self.run_name is not None:
            return self
        if self.resume is not None:
            return dataclasses.replace(self, run_name=Path(self.resume).name)
        return dataclasses.replace(self, run_name=default_run_name(self.env_id, self.seed, now))

    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` named by :attr:`dtype`."""
        import torch  # local: keep `import trpo.config` light for the CLI's --help

        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def torch_device(self) -> Any:
        """The ``torch.device`` named by :attr:`device` (``'auto'``: cuda when available)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> TRPOConfig:
        """Inverse of :meth:`to_dict`; missing fields take the dataclass defaults.

        Args:
            data: field name → value (lists are accepted for tuple fields).
            strict: raise on keys that are not fields (else ignore them).

        Raises:
            ValueError: on unknown keys (``strict``) or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"data must be a mapping of field names (got {type(data).__name__})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise ValueError(f"unknown TRPOConfig field(s): {', '.join(map(str, unknown))}")
        kwargs = {k: v for k, v in data.items() if k in names}
        for name in _tuple_fields():
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)


# --- validation helpers ---------------------------------------------------------------------
def _check_int(cfg: TRPOConfig, name: str, *, minimum: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        what = "a positive int" if minimum == 1 else f"an int ≥ {minimum}"
        raise ValueError(f"{name} must be {what} (got {v!r})")


def _check_real(
    cfg: TRPOConfig,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if low == -math.inf and high == math.inf:
            rng = "a finite number"
        elif high == math.inf:
            rng = f"a finite number {'>' if low_open else '≥'} {low:g}"
        else:
            rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {rng} (got {v!r})")


def _check_str(cfg: TRPOConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty string (got {v!r})")


def _tuple_fields() -> list[str]:
    hints = typing.get_type_hints(TRPOConfig)
    return [
        f.name for f in dataclasses.fields(TRPOConfig) if typing.get_origin(hints[f.name]) is tuple
    ]


# --- presets --------------------------------------------------------------------------------
# Starting points from rl-baselines3-zoo's tuned TRPO hyperparameters (hyperparams/trpo.yml);
# zoo's `normalize: true` is obs + reward normalisation, `batch_size` is the critic minibatch.
# The scores they reach are in docs/benchmarks.md.
_MUJOCO: dict[str, Any] = dict(
    total_steps=1_000_000,
    n_envs=2,
    n_steps=1024,
    gamma=0.99,
    gae_lambda=0.95,
    max_kl=0.01,
    cg_iters=25,
    cg_damping=0.1,
    critic_lr=1e-3,
    critic_epochs=20,
    critic_minibatch_size=128,
    normalize_obs=True,
    normalize_reward=True,
)

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "CartPole-v1": MappingProxyType(
            dict(
                total_steps=100_000,
                n_envs=2,
                n_steps=512,
                gamma=0.99,
                gae_lambda=0.98,
                cg_damping=1e-3,
                critic_lr=1e-3,
                critic_epochs=20,
                critic_minibatch_size=512,
            )
        ),
        # zoo's Pendulum uses gSDE; with plain Gaussian noise a larger batch and trust region
        # and a short horizon (γ = 0.9) are the usual remedy.
        "Pendulum-v1": MappingProxyType(
            dict(
                total_steps=200_000,
                n_envs=4,
                n_steps=512,
                gamma=0.9,
                gae_lambda=0.95,
                max_kl=0.03,
                cg_iters=15,
                cg_damping=0.1,
                critic_lr=1e-3,
                critic_epochs=20,
                critic_minibatch_size=256,
                normalize_obs=True,
                normalize_reward=True,
            )
        ),
        "Hopper-v5": MappingProxyType(dict(_MUJOCO)),
        # zoo tunes HalfCheetah with a wider trust region (target_kl 0.04).
        "HalfCheetah-v5": MappingProxyType({**_MUJOCO, "max_kl": 0.04}),
        "Walker2d-v5": MappingProxyType(dict(_MUJOCO)),
    }
)
"""Per-env overrides of the :class:`TRPOConfig` defaults, applied by :func:`config_for`."""


def config_for(env_id: str, **overrides: Any) -> TRPOConfig:
    """The config for ``env_id``: dataclass defaults < ``PRESETS[env_id]`` < ``overrides``.

    Envs without a preset get the dataclass defaults.

    Raises:
        ValueError: on an override that is not a field, or an invalid value.
    """
    names = {f.name for f in dataclasses.fields(TRPOConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown TRPOConfig field(s): {', '.join(unknown)}")
    if "env_id" in overrides and overrides["env_id"] != env_id:
        raise ValueError(f"env_id given twice: {env_id!r} and {overrides['env_id']!r}")
    values = {**PRESETS.get(env_id, {}), **overrides, "env_id": env_id}
    return TRPOConfig(**values)


def check_env_id(env_id: str) -> None:
    """Raise if ``env_id`` is not registered with gymnasium (without creating the env).

    Ids of the form ``"module:Env-v0"`` are accepted unchecked: gymnasium imports the module
    when making the env.

    Raises:
        ValueError: naming the id, close matches, and how to list the registered ids.
    """
    import difflib

    import gymnasium

    if ":" in env_id or env_id in gymnasium.registry:
        return
    close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"env_id {env_id!r} is not a registered gymnasium environment.{hint} "
        'List the ids with: python -c "import gymnasium; gymnasium.pprint_registry()"'
    )


def default_run_name(env_id: str, seed: int, now: _dt.datetime | None = None) -> str:
    """``'<env_id>__<seed>__<YYYYmmdd-HHMMSS>'`` with path-unsafe characters replaced by '_'."""
    now = now or _dt.datetime.now()
    safe_env = re.sub(r"[^A-Za-z0-9._=+-]", "_", env_id)
    return f"{safe_env}__{seed}__{now:%Y%m%d-%H%M%S}"


# --- JSON persistence -----------------------------------------------------------------------
def save_config(config: TRPOConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``config.to_dict()`` as ``run_dir/config.json`` (atomically); return the path."""
    path = Path(run_dir) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_config(run_dir: str | os.PathLike[str]) -> TRPOConfig:
    """Read ``run_dir/config.json`` written by :func:`save_config`.

    Raises:
        ValueError: if the file is missing, not JSON, or holds invalid fields.
    """
    path = Path(run_dir) / CONFIG_FILENAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: is {run_dir} a run directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return TRPOConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# --- CLI ------------------------------------------------------------------------------------
_ENV_FLAGS = ("--env", "--env-id", "--env_id")


def _scan_flag(argv: Sequence[str], flags: Sequence[str]) -> str | None:
    """Value of the last ``--flag VALUE`` / ``--flag=VALUE`` in ``argv`` (argparse: last wins)."""
    value = None
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if tok in flags and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        else:
            for f in flags:
                if tok.startswith(f + "="):
                    value = tok[len(f) + 1 :]
    return value


def parse_cli(argv: Sequence[str] | None = None, *, prog: str | None = None) -> TRPOConfig:
    """Build a :class:`TRPOConfig` from command-line flags named after the fields.

    ``--env-id`` (alias ``--env``) is read first to pick the preset, which then serves as the
    defaults shown by ``--help``; any flag the user typed overrides it. With
    ``--resume RUN_DIR`` the run's saved ``config.json`` is the base instead, and typed flags
    still override it (e.g. a larger ``--total-steps``); its env may not be changed.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
        prog: program name shown in the usage line.

    Raises:
        SystemExit: on ``--help`` (code 0) or a bad flag or value (code 2, after printing a
            message that names the field).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    env_id = _scan_flag(argv, _ENV_FLAGS)
    resume = _scan_flag(argv, ("--resume",))
    try:
        if resume is not None and resume != "None":
            saved = load_config(resume)
            if env_id is not None and env_id != saved.env_id:
                raise ValueError(
                    f"--env-id {env_id} differs from the env of the run being resumed "
                    f"({saved.env_id}); start a new run instead"
                )
            base = dataclasses.replace(saved, resume=resume)
        else:
            base = config_for(env_id or TRPOConfig.env_id)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return tyro.cli(TRPOConfig, args=argv, default=base, prog=prog)


# --- memory budget (issue 6: refuse what would not fit rather than be OOM-killed) ------------
class MemoryBudgetError(ValueError):
    """The rollout/update buffers of a config would not fit in the available memory."""


def estimate_rollout_bytes(config: TRPOConfig, obs_dim: int, act_dim: int) -> int:
    """Conservative estimate of the memory one rollout and one update need, in bytes.

    With ``B = n_envs·n_steps``, ``b`` the dtype's bytes, ``W_a = obs_dim + Σhidden + act_dim``
    and ``W_c = obs_dim + Σhidden + 1`` (actor and critic widths) and
    ``B_f = ceil(fvp_fraction·B)``::

        rollout = B · (2·obs_dim + 3·act_dim + 8) · b
            # obs, true next obs, action, π_old's parameters (≤ 2·act_dim), and 8 scalars:
            # log-prob, reward, termination, truncation, value, next value, advantage, return
        update  = (2·B·W_a + 4·B_f·W_a + 2·B·W_c) · b
            # activations (pre/post) kept for the surrogate gradient (B states), the Fisher
            # linearisation plus its tangents (B_f states) and the critic's values (B states)
        total   = 1.5 · (rollout + update)      # allocator slack and temporaries

    Args:
        config: the run's config.
        obs_dim: flattened observation size.
        act_dim: distribution parameters per state: K logits for Discrete(K), d for a
            d-dimensional Box (mean; log σ is state-independent), Σ K_i for MultiDiscrete.

    Returns:
        The estimate in bytes (an int).
    """
    for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (got {v!r})")
    b = 4 if config.dtype == "float32" else 8
    batch = config.batch_size
    fvp_batch = math.ceil(config.fvp_fraction * batch)
    hidden = sum(config.hidden_sizes)
    w_actor = obs_dim + hidden + act_dim
    w_critic = obs_dim + hidden + 1
    rollout = batch * (2 * obs_dim + 3 * act_dim + 8) * b
    update = (2 * batch * w_actor + 4 * fvp_batch * w_actor + 2 * batch * w_critic) * b
    return math.ceil(1.5 * (rollout + update))


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the least of the OS's available memory and any
    cgroup (container) limit; None when it cannot be determined."""
    candidates: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),  # cgroup v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
            if limit != "max" and int(limit) < 2**60:  # v1 reports "no limit" as a huge number
                candidates.append(max(int(limit) - usage, 0))
        except (OSError, ValueError):
            pass
    return min(candidates) if candidates else None


def check_memory(
    config: TRPOConfig, obs_dim: int, act_dim: int, *, available_bytes: int | None = None
) -> int:
    """Refuse a batch configuration whose buffers would not fit in memory.

    The budget is, in order: ``available_bytes`` if given, ``config.memory_limit_gb`` if set,
    else :func:`available_memory_bytes` (and, for a CUDA device, the GPU's free memory too).
    Without any known budget the check passes.

    Returns:
        The estimate of :func:`estimate_rollout_bytes`, in bytes.

    Raises:
        MemoryBudgetError: (a ``ValueError``) with the estimate, the budget and what to lower.
    """
    need = estimate_rollout_bytes(config, obs_dim, act_dim)
    budgets: list[tuple[int, str]] = []
    if available_bytes is not None:
        budgets.append((int(available_bytes), "the given budget"))
    elif config.memory_limit_gb is not None:
        budgets.append((int(config.memory_limit_gb * _GIB), "memory_limit_gb"))
    else:
        host = available_memory_bytes()
        if host is not None:
            budgets.append((host, "available host memory"))
        if config.device.startswith("cuda") or config.device == "auto":
            try:
                import torch

                if torch.cuda.is_available():
                    dev = config.torch_device()
                    budgets.append((torch.cuda.mem_get_info(dev)[0], f"free memory on {dev}"))
            except Exception:  # a broken CUDA setup is reported when the device is used
                pass
    for budget, what in budgets:
        if need > budget:
            raise MemoryBudgetError(
                f"a batch of n_envs × n_steps = {config.n_envs} × {config.n_steps} = "
                f"{config.batch_size} transitions (obs_dim {obs_dim}, act_dim {act_dim}, "
                f"hidden {config.hidden_sizes}, {config.dtype}) needs about "
                f"{need / _GIB:.2f} GiB, more than {what} ({budget / _GIB:.2f} GiB); "
                "lower n_envs or n_steps (or fvp_fraction), or raise memory_limit_gb"
            )
    return need
