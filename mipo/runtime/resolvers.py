"""Registering OmegaConf resolvers on every omegaconf release mipo supports.

omegaconf 2.4 made ``OmegaConf.register_resolver`` the name to use and warns on ``register_new_resolver`` (a
``UserWarning`` on stderr, printed before an entry point's own clean error message). Up to 2.3, which
hydra-core 1.3.2+ pins, ``register_resolver`` is the legacy API and warns itself: the release decides.
"""

from __future__ import annotations

from typing import Any, Callable

import omegaconf
from omegaconf import OmegaConf

NEW_API = tuple(int(part) for part in omegaconf.__version__.split(".")[:2]) >= (2, 4)


def register_resolver(name: str, resolver: Callable[..., Any]) -> None:
    """Register ``${name:...}`` once (a second registration in the same process is a no-op)."""
    if OmegaConf.has_resolver(name):
        return
    register = OmegaConf.register_resolver if NEW_API else OmegaConf.register_new_resolver
    register(name, resolver)
