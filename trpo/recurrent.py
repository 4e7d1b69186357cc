"""Recurrent TRPO: a GRU policy over sequences, its state reset at episode starts.

For a partially observed env the policy conditions on the history through a GRU::

    h_t = GRU(e(x_t), h_{t−1} · (1 − start_t)),     z_t = head(h_t)

(``e`` an MLP encoder, ``z_t`` the distribution parameters, ``start_t`` = 1 on the first
step of an episode). What each step of TRPO sees:

* **Rollout** (:mod:`trpo.rollout`): the cell runs once per env step (:meth:`GRUActor.step`);
  every stored observation is *packed* as ``[start_t, h_in_t, x_t]`` (width ``1 + H + D``),
  ``h_in_t = h_{t−1} · (1 − start_t)`` the state the cell started from.
* **Surrogate, mean KL, Fisher** (:mod:`trpo.update`, unchanged): the rollout is cut into
  sequences of ``L`` steps per env (:func:`sequence_batch`; ``config.bptt_length``, 0 = the
  whole rollout): each starts from its stored ``h_in`` (a constant: truncated BPTT) and runs
  the cell over its ``L`` steps with the resets, so every quantity is that of the sequence
  model and natgrad's :func:`~natgrad.fisher_operator` on ``torch.func`` is exactly the
  Hessian of the mean KL over the ``B·L`` steps (tests/test_recurrent.py: double backprop).
  At θ_old the recomputed states equal the stored ones, so the ratios start at 1.
* **Critic**: the built-in MLP on the packed row: ``V(x_t, h_in_t)``, the memory the policy
  had before seeing ``x_t``; a final observation is valued with the state after the last
  step (``[0, h_out_t, x_final]``), so truncations still bootstrap correctly.

The hidden state carried between rollouts lives in :class:`trpo.rollout.RolloutState`;
an env reset (start, resume) starts from zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from natgrad.families import DistParams
from trpo.modules import ModuleActor
from trpo.policy import action_family

__all__ = [
    "GRUActor",
    "GRUNet",
    "SequenceRecord",
    "packed_space",
    "sequence_batch",
    "to_sequences",
]


class GRUNet(nn.Module):
    """Packed rows ``(B, 1+H+D)`` or sequences ``(B, L, 1+H+D)`` → outputs ``(B·L, out)``.

    Encoder: the MLP of ``hidden_sizes[:-1]`` with ``activation``; GRU of width
    ``H = hidden_sizes[-1]`` (the gate equations of :class:`torch.nn.GRUCell`, written out
    so that every ``torch.func`` transform applies); a linear head (orthogonal init with
    ``last_gain``). Row ``b·L + l`` of the output is step ``l`` of sequence ``b``.
    """

    def __init__(
        self, obs_dim: int, hidden_sizes: Sequence[int], activation: str, out: int,
        last_gain: float,
    ):
        super().__init__()
        *widths, self.hidden_size = hidden_sizes
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        layers, width = [], obs_dim
        for w in widths:
            layers += [nn.Linear(width, w), act()]
            width = w
        self.encoder = nn.Sequential(*layers)
        H = self.hidden_size
        self.input_gates, self.hidden_gates = nn.Linear(width, 3 * H), nn.Linear(H, 3 * H)
        self.head = nn.Linear(H, out)
        for m in self.encoder:
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight, math.sqrt(2.0))
                nn.init.zeros_(m.bias)
        nn.init.orthogonal_(self.head.weight, last_gain)
        nn.init.zeros_(self.head.bias)

    def _cell(self, gates_x: Tensor, h: Tensor) -> Tensor:
        """One GRU step from the input gates ``W_i e(x) + b_i`` and the state ``h``."""
        xr, xz, xn = gates_x.chunk(3, -1)
        hr, hz, hn = self.hidden_gates(h).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return (1 - z) * torch.tanh(xn + r * hn) + z * h

    def step(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(head(h'), h')`` with ``h' = GRU(e(x), h)``: ``x (N, D)``, ``h (N, H)``."""
        h = self._cell(self.input_gates(self.encoder(x)), h)
        return self.head(h), h

    def forward(self, packed: Tensor) -> Tensor:
        seq = packed if packed.ndim == 3 else packed.unsqueeze(1)
        H = self.hidden_size
        keep, h = 1 - seq[..., :1], seq[:, 0, 1 : 1 + H]
        gates_x = self.input_gates(self.encoder(seq[..., 1 + H :]))  # all steps at once
        states = []
        for t in range(seq.shape[1]):
            h = self._cell(gates_x[:, t], h * keep[:, t])
            states.append(h)
        return self.head(torch.stack(states, 1).flatten(0, 1))


class GRUActor(ModuleActor):
    """The recurrent policy: :class:`GRUNet` behind the actor interface of
    :class:`~trpo.modules.ModuleActor` (its ``forward`` takes packed rows or sequences)."""

    recurrent = True

    def __init__(self, config: object, observation_space: gym.Space, action_space: gym.Space):
        obs_dim, out = _flat_dim(observation_space), action_family(action_space)[1]
        net = GRUNet(obs_dim, config.hidden_sizes, config.activation, out, last_gain=0.01)
        self.hidden_size = net.hidden_size
        super().__init__(net, packed_space(observation_space, net.hidden_size), action_space)

    def step(self, x: Tensor, h: Tensor | None) -> tuple[DistParams, Tensor]:
        """One env step: ``(dist params (N, ...), next state (N, H))`` for ``x (N, D)`` and
        the state ``h`` (None: zeros, an episode's start)."""
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        out, h = self.net.step(x, h)
        return self.structure(out), h


def _flat_dim(space: gym.Space) -> int:
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
        raise ValueError(
            f"policy='gru' needs flat Box observations (D,), got {space}; image observations "
            "take --policy cnn"
        )
    return int(space.shape[0])


def packed_space(observation_space: gym.Space, hidden_size: int) -> gym.spaces.Box:
    """The space of packed rows ``[start, h_in, x]`` (what the critic and the update see)."""
    width = 1 + hidden_size + _flat_dim(observation_space)
    return gym.spaces.Box(-np.inf, np.inf, (width,), dtype=np.float32)


@dataclass
class SequenceRecord:
    """The states of one rollout (``T`` steps, ``N`` envs, width ``H``), filled step by step.

    Attributes:
        h_in: ``(T+1, N, H)`` the state each step starts from (row ``T``: the next rollout's).
        h_out: ``(T, N, H)`` the state after each step.
        starts: ``(T+1, N)`` bool, the episode-start flags.
        h_prev: ``(N, H)`` the state before step 0 (the previous rollout's last).
    """

    h_in: Tensor
    h_out: Tensor
    starts: Tensor
    h_prev: Tensor

    @classmethod
    def start(cls, T: int, N: int, H: int, h: Tensor | None, starts: np.ndarray | None,
              like: Tensor) -> SequenceRecord:
        """An empty record continuing from the state ``h`` and flags ``starts`` (None: zeros,
        every env starting an episode)."""
        flags = torch.ones(T + 1, N, dtype=torch.bool, device=like.device)
        if starts is not None:
            flags[0] = torch.from_numpy(starts)
        h_prev = like.new_zeros(N, H) if h is None else h
        return cls(like.new_zeros(T + 1, N, H), like.new_zeros(T, N, H), flags, h_prev)

    def state_in(self, t: int, done_before: np.ndarray | None) -> Tensor:
        """``h_in_t = h_{t−1}·(1 − start_t)`` (``done_before``: the flags of step t−1)."""
        if done_before is not None:
            self.starts[t] = torch.from_numpy(done_before)
        self.h_in[t] = (self.h_out[t - 1] if t else self.h_prev) * ~self.starts[t, :, None]
        return self.h_in[t]

    def features(self, final_rows: Sequence[tuple[int, int]]) -> Tensor:
        """``[start, h]`` columns for the ``(T+1)·N`` rows of the rollout grid, then for each
        ended episode ``(t, i)`` its final observation's: ``[0, h_out[t, i]]``."""
        T, N, H = self.h_out.shape
        grid = torch.cat([self.starts[:, :, None].to(self.h_in), self.h_in], -1).flatten(0, 1)
        if not final_rows:
            return grid
        t_idx, i_idx = (torch.tensor(ix, device=grid.device) for ix in zip(*final_rows))
        h = self.h_out[t_idx, i_idx]
        return torch.cat([grid, torch.cat([h.new_zeros(h.shape[0], 1), h], -1)])


def to_sequences(x: Tensor, length: int) -> Tensor:
    """``(T, N, ...)`` → ``(T/L·N, L, ...)``: each row ``L`` consecutive steps of one env."""
    T = x.shape[0]
    return x.unflatten(0, (T // length, length)).transpose(1, 2).flatten(0, 1)


def sequence_batch(
    obs: Tensor, length: int, *per_step: Tensor | None
) -> tuple[Tensor, ...]:
    """A recurrent rollout's batch (all ``(T, N, ...)``): the packed observations as sequences
    ``(B, L, 1+H+D)``, then each of ``per_step`` (actions, advantages, masks, returns; None
    passes through) flattened in the order of the actor's output rows (``b·L + l``)."""
    flat = [to_sequences(t, length).flatten(0, 1) if t is not None else None for t in per_step]
    return to_sequences(obs, length), *flat
