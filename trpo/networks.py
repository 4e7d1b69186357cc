"""Which networks a run trains: the user's modules, the factories named in the config, or the
built-in ones (one place, shared by training, resuming and evaluation).

Precedence, per network: a module passed to ``train(config, actor=..., critic=...)``, else
``config.actor_factory`` / ``config.critic_factory`` (``"package.module:factory"``, called as
``factory(observation_space, action_space)``), else the built-in MLP of ``hidden_sizes``.
Modules are wrapped by :class:`trpo.modules.ModuleActor` / :class:`~trpo.modules.ModuleCritic`
(protocol checked once, see :mod:`trpo.modules`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from torch import nn

from trpo.modules import ModuleActor, ModuleCritic, load_factory
from trpo.policy import Actor, Critic, make_actor, make_critic

__all__ = ["build_actor", "build_critic"]


def build_actor(
    config: Any, observation_space: gym.Space, action_space: gym.Space, module: nn.Module | None = None
) -> Actor | ModuleActor:
    """The actor of ``config`` for single-env spaces (``module``, the factory, or built in).

    Raises:
        ValueError: an unsupported space, a factory that cannot be imported, or a module that
            breaks the protocol (:class:`trpo.modules.ModuleProtocolError`).
    """
    if module is None and config.actor_factory is not None:
        module = load_factory(config.actor_factory, "actor_factory")(observation_space, action_space)
    if module is not None:
        return ModuleActor(module, observation_space, action_space)
    return make_actor(observation_space, action_space, config.hidden_sizes)


def build_critic(
    config: Any, observation_space: gym.Space, action_space: gym.Space, module: nn.Module | None = None
) -> Critic | ModuleCritic:
    """The critic of ``config`` (``module``, the factory, or built in); errors as
    :func:`build_actor`."""
    if module is None and config.critic_factory is not None:
        factory = load_factory(config.critic_factory, "critic_factory")
        module = factory(observation_space, action_space)
    if module is not None:
        return ModuleCritic(module, observation_space)
    return make_critic(observation_space, config.hidden_sizes)
