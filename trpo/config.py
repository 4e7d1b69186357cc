"""Every TRPO hyperparameter in one frozen dataclass: fields, validation, JSON save and load.

Three layers decide a value, lowest first:

1. the dataclass defaults of :class:`TRPOConfig` (a generic setting that learns CartPole-v1),
2. the preset of the chosen env (:data:`trpo.presets.PRESETS`, applied by
   :func:`trpo.presets.config_for`),
3. what the caller gave: keyword arguments of ``TRPOConfig(...)`` / ``config_for(...)``, or the
   flags typed on the command line (:func:`trpo.run.parse_cli`).

When resuming (``resume=RUN_DIR``), the run's saved ``config.json`` replaces layers 1-2:
:func:`resume_config` puts only the fields the caller *gave* on top of it. A config records
them in :attr:`TRPOConfig.given_fields` (the keyword arguments of its constructor; ``config_for``
counts its overrides and the env id, not the preset), so ``TRPOConfig(resume=d,
critic_epochs=10)`` sets 10 even though 10 is the default, and ``config_for(env, resume=d)``
keeps the saved hyperparameters. ``dataclasses.replace`` passes every field to the
constructor, so its result counts every field as given.

The config is frozen: derive variants with ``dataclasses.replace(config, field=value)``;
every construction re-runs :meth:`TRPOConfig.validate`, so an invalid field is reported by
name before any env is created.

Example:
    >>> from trpo.config import TRPOConfig
    >>> TRPOConfig(max_kl=0.02).max_kl
    0.02
    >>> sorted(TRPOConfig(max_kl=0.02, seed=3).given_fields)
    ['max_kl', 'seed']
    >>> TRPOConfig(max_kl=0.0)
    Traceback (most recent call last):
    ...
    ValueError: max_kl must be a finite number > 0 (got 0.0)
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import difflib
import functools
import json
import math
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import gymnasium
import torch
import tyro

from natgrad.mlp import ACTIVATIONS
from trpo.envpool_env import BACKENDS
from trpo.fileio import RunDirError, atomic_write_bytes, read_regular_file
from trpo.masks import MASK_MODES

__all__ = [
    "CONFIG_FILENAME",
    "FIXED_ON_RESUME",
    "LOG_STD_INIT_BOUND",
    "TRPOConfig",
    "check_device",
    "check_env_id",
    "default_run_name",
    "load_config",
    "resume_config",
    "save_config",
]

CONFIG_FILENAME = "config.json"
_MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB; anything larger is not ours
"""Name of the resolved config saved in every run directory."""

FIXED_ON_RESUME = (
    "env_id",
    "hidden_sizes",
    "normalize_obs",
    "normalize_reward",
    "actor_factory",
    "critic_factory",
    "policy",
    "activation",
)
"""Fields a resumed run cannot change: the checkpoint's networks and statistics are theirs."""

LOG_STD_INIT_BOUND = 20.0
"""``log_std_init`` must lie in ``[-LOG_STD_INIT_BOUND, LOG_STD_INIT_BOUND]``."""

_DEVICE_RE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9._=+-]+$")
_INT_FIELDS = {  # name -> minimum
    **dict.fromkeys(("seed", "eval_episodes", "torch_threads", "env_threads", "bptt_length"), 0),
    **dict.fromkeys(
        (
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
        ),
        1,
    ),
}
_BOOL_FIELDS = (
    "async_envs",
    "normalize_advantages",
    "normalize_obs",
    "normalize_reward",
    "tensorboard",
    "plot",
    "progress",
    "cuda_graph",
)


def _records_given_fields(cls: type) -> type:
    """Make the dataclass ``__init__`` of ``cls`` also record the names of the fields it was
    given (positionally or by keyword) as ``_given``, before it fills in the defaults."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


@_records_given_fields
@dataclasses.dataclass(frozen=True)
class TRPOConfig:
    """TRPO (Schulman et al. 2015) with GAE, a CG natural step and a backtracking line search.

    Besides its fields, a config knows which of them its caller gave (:attr:`given_fields`):
    what a resumed run takes over from it (:func:`resume_config`).
    """

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
    """gymnasium: run the envs in subprocesses (AsyncVectorEnv) instead of in this process.
    envpool: overlap the policy of one half of the envs with the simulation of the other (two
    pools; the same rollout, faster; n_envs >= 2)."""
    env_backend: Literal["gymnasium", "envpool", "auto"] = "gymnasium"
    """Simulator of the training envs: 'gymnasium', 'envpool' (C++ thread pool, same semantics,
    pip install -e '.[envpool]'; docs/envpool.md) or 'auto' (envpool when installed and it has
    the id). config.json records the one that ran; evaluation always uses gymnasium's env."""
    env_threads: int = 0
    """envpool worker threads per pool (async_envs: two pools); 0 = envpool's default,
    min(envs in the pool, cores). Unused by gymnasium."""
    action_masks: Literal["auto", "on", "off"] = "auto"
    """Invalid-action masks (Discrete/MultiDiscrete) from info['action_mask'] or an env method
    action_masks(): 'auto' = where the env provides them, 'on' = required, 'off' = ignored.
    Used in sampling, log-probs, entropy, KL, Fisher and evaluation (docs/policies.md)."""

    # --- networks ---------------------------------------------------------------------------
    policy: Literal["auto", "mlp", "cnn", "gru"] = "auto"
    """Built-in network: 'mlp', 'cnn' (Nature-CNN-like, uint8 images scaled by 1/255, then an
    MLP of hidden_sizes), 'gru' (recurrent: an MLP encoder of hidden_sizes[:-1], a GRU of width
    hidden_sizes[-1] reset at episode starts; flat observations; docs/policies.md) or 'auto'
    (cnn for (H, W, C) uint8 image observations, else mlp; Dict/Tuple observations are
    flattened and concatenated)."""
    bptt_length: int = 0
    """policy gru: steps per training sequence (truncated backpropagation through time; each
    sequence starts from the state stored in the rollout); 0 = n_steps. Must divide n_steps."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the actor and of the critic MLP (after the CNN's features for
    policy cnn); empty = linear."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Activation of the hidden MLP layers."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the diagonal Gaussian policy (Box actions only), in
    [-20, 20]: σ = exp(log_std_init) must be a usable, finite standard deviation."""
    actor_factory: str | None = None
    """Your actor network: 'package.module:factory', called as factory(observation_space,
    action_space) -> torch.nn.Module returning the distribution parameters (docs/policies.md);
    None = the built-in network."""
    critic_factory: str | None = None
    """Your critic network: 'package.module:factory', called as factory(observation_space,
    action_space) -> torch.nn.Module returning values (B,) or (B, 1); None = built in."""

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
    """Name of a NEW run directory under runs_root (an existing one is refused: resume it);
    None = '<env_id>__<seed>__<timestamp>', with a suffix -2, -3, ... when that is taken."""
    resume: str | None = None
    """Run directory to continue from its newest valid checkpoint: its config.json is the base
    and only the fields given explicitly (the flags typed) override it."""
    tensorboard: bool = True
    """Also write TensorBoard events (only if the tensorboard package is installed)."""
    plot: bool = True
    """Save a learning-curve SVG (learning_curve.svg) in the run directory at the end."""
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

    @property
    def given_fields(self) -> frozenset[str]:
        """Names of the fields the caller gave explicitly (the constructor's arguments, or what
        :meth:`with_given` set); the others hold defaults or a preset."""
        return self.__dict__.get("_given", frozenset())

    def with_given(self, names: Iterable[str]) -> TRPOConfig:
        """This config, with exactly ``names`` counted as given by the caller.

        Raises:
            ValueError: on a name that is not a field.
        """
        names = frozenset(names)
        unknown = sorted(names - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown TRPOConfig field(s): {', '.join(unknown)}")
        out = copy.copy(self)
        object.__setattr__(out, "_given", names)
        return out

    def validate(self) -> None:
        """Check every field; called on construction.

        Raises:
            ValueError: naming the first invalid field, its constraint and its value.
        """
        _check_str(self, "env_id")
        for name, minimum in _INT_FIELDS.items():
            _check_int(self, name, minimum=minimum)
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
        # exp(±20) ≈ 5·10⁸ / 2·10⁻⁹: far beyond any sensible σ, yet finite with room in float32
        # (exp overflows past 88); outside it the Gaussian's density under- or overflows.
        _check_real(self, "log_std_init", low=-LOG_STD_INIT_BOUND, high=LOG_STD_INIT_BOUND)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (got {getattr(self, name)!r})")
        if not isinstance(self.hidden_sizes, tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in self.hidden_sizes
        ):
            raise ValueError(
                f"hidden_sizes must be a tuple of positive ints (got {self.hidden_sizes!r})"
            )
        for name in ("actor_factory", "critic_factory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _FACTORY_RE.match(value)):
                raise ValueError(
                    f"{name} must be None or an import path 'package.module:factory' "
                    f"(got {value!r})"
                )
        _check_str(self, "runs_root")
        if self.run_name is not None and (
            not isinstance(self.run_name, str)
            or not _RUN_NAME_RE.match(self.run_name)
            or self.run_name in (".", "..")
        ):
            raise ValueError(
                "run_name must be None or a directory name of letters, digits and ._=+- "
                f"(not '.' or '..', no path separators) (got {self.run_name!r})"
            )
        if self.resume is not None:
            _check_str(self, "resume")
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (got {self.device!r})"
            )
        if self.env_backend not in BACKENDS:
            raise ValueError(f"env_backend must be one of {BACKENDS} (got {self.env_backend!r})")
        if self.policy not in ("auto", "mlp", "cnn", "gru"):
            raise ValueError(f"policy must be 'auto', 'mlp', 'cnn' or 'gru' (got {self.policy!r})")
        if self.policy == "gru":
            self._check_recurrent()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be 'tanh' or 'relu' (got {self.activation!r})")
        if self.action_masks not in MASK_MODES:
            raise ValueError(f"action_masks must be 'auto', 'on' or 'off' (got {self.action_masks!r})")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64' (got {self.dtype!r})")
        if self.memory_limit_gb is not None:
            _check_real(self, "memory_limit_gb", low=0.0, low_open=True)

    def _check_recurrent(self) -> None:
        if self.bptt_length and self.n_steps % self.bptt_length:
            raise ValueError(
                f"bptt_length ({self.bptt_length}) must divide n_steps ({self.n_steps})"
            )
        for bad, why in (
            (self.actor_factory or self.critic_factory, "actor_factory/critic_factory (the GRU "
             "is built in; a recurrent module of your own is not supported)"),
            (self.async_envs and self.env_backend != "gymnasium", "envpool's async collection"),
            (not self.hidden_sizes, "empty hidden_sizes (the last width is the GRU's)"),
        ):
            if bad:
                raise ValueError(f"policy='gru' does not work with {why}")

    # ----------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Transitions per update (per rank): ``n_envs * n_steps``."""
        return self.n_envs * self.n_steps

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
            return dataclasses.replace(self, run_name=_dir_name(self.resume))
        return dataclasses.replace(self, run_name=default_run_name(self.env_id, self.seed, now))

    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by :attr:`dtype`."""
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    def torch_device(self) -> torch.device:
        """The ``torch.device`` named by :attr:`device` (``'auto'``: cuda when available)."""
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


def _dir_name(path: str) -> str:
    """The last component of ``path``, also for ``.`` or ``runs/x/`` (not following links)."""
    return Path(os.path.abspath(path)).name


# --- env ids and run names --------------------------------------------------------------------
def check_env_id(env_id: str) -> None:
    """Raise if ``env_id`` is not registered with gymnasium (without creating the env).

    Ids of the form ``"module:Env-v0"`` are accepted unchecked: gymnasium imports the module
    when making the env.

    Raises:
        ValueError: naming the id, close matches, and how to list the registered ids.
    """
    if ":" in env_id or env_id in gymnasium.registry:
        return
    close = difflib.get_close_matches(env_id, list(gymnasium.registry), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"env_id {env_id!r} is not a registered gymnasium environment.{hint} "
        'List the ids with: python -c "import gymnasium; gymnasium.pprint_registry()"'
    )


def check_device(device: str) -> None:
    """Raise if the torch device named by a valid ``device`` field cannot be used here.

    ``'cpu'`` and ``'auto'`` always can; ``'cuda'`` / ``'cuda:N'`` need a visible GPU
    (number N); ``'mps'`` needs Apple's Metal backend. It is not part of
    :meth:`TRPOConfig.validate`: a config made on a GPU machine must still load elsewhere.

    Raises:
        ValueError: naming the device, why it cannot be used, and what to pass instead.
    """
    if device in ("cpu", "auto"):
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                "device 'mps' is not available on this machine (torch.backends.mps."
                "is_available() is False); use --device cpu, or auto"
            )
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        seen = f"{count} visible GPU(s)" if count else "no GPU visible to torch"
        if torch.version.cuda is None:
            seen += ", and this torch is built without CUDA"
        raise ValueError(
            f"device {device!r} is not available: {seen}; use --device cpu, or auto "
            "(cuda when available)"
        )


def default_run_name(env_id: str, seed: int, now: _dt.datetime | None = None) -> str:
    """``'<env_id>__<seed>__<YYYYmmdd-HHMMSS>'`` with path-unsafe characters replaced by '_'."""
    now = now or _dt.datetime.now()
    safe_env = re.sub(r"[^A-Za-z0-9._=+-]", "_", env_id)
    return f"{safe_env}__{seed}__{now:%Y%m%d-%H%M%S}"


# --- JSON persistence and resume --------------------------------------------------------------
def save_config(config: TRPOConfig, run_dir: str | os.PathLike[str]) -> Path:
    """Write ``config.to_dict()`` as ``run_dir/config.json`` (atomically); return the path."""
    path = Path(run_dir) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode())


def load_config(run_dir: str | os.PathLike[str]) -> TRPOConfig:
    """Read ``run_dir/config.json`` written by :func:`save_config` (every field counts as given).

    Raises:
        ValueError: if the file is missing, not JSON, or holds invalid fields.
    """
    path = Path(run_dir) / CONFIG_FILENAME
    try:
        data = json.loads(read_regular_file(path, max_bytes=_MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise ValueError(f"{path} not found: is {run_dir} a run directory?") from None
    except RunDirError as e:  # a link, FIFO or device, or far too large: never read it
        raise ValueError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return TRPOConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def resume_config(config: TRPOConfig) -> TRPOConfig:
    """The config a resumed run trains with: the saved ``config.json`` of ``config.resume``,
    with the fields in ``config.given_fields`` taken from ``config`` (all others are the
    saved ones); ``run_name`` is the run directory's name. Idempotent.

    Raises:
        ValueError: ``config.resume`` is None or has no valid ``config.json``, or a given field
            in :data:`FIXED_ON_RESUME` differs from the saved one.
    """
    if config.resume is None:
        raise ValueError("resume is None: resume_config needs the run directory to continue")
    saved = load_config(config.resume)
    overrides = {
        name: getattr(config, name)
        for name in config.given_fields - {"resume", "run_name"}
        if getattr(config, name) != getattr(saved, name)
    }
    for name in FIXED_ON_RESUME:
        if name in overrides:
            raise ValueError(
                f"{name} is {overrides[name]!r} but the run in {config.resume} was made with "
                f"{getattr(saved, name)!r}: a resumed run keeps its {name} (its checkpoint "
                "holds networks and statistics made for it); start a new run to change it"
            )
    return dataclasses.replace(
        saved, **overrides, resume=config.resume, run_name=_dir_name(config.resume)
    )
