"""flux-agent: an embeddable asyncio sidecar that takes ETL step events on localhost, spools
them durably, and delivers them to PostgreSQL exactly once.

Public API: :class:`Agent`, :class:`AgentConfig`, :func:`load_config`, the clients
:class:`FluxClient` and :class:`AsyncFluxClient`, and the error tree. ``Agent`` and the
clients are imported on first use, so a workload that only needs the standard-library
``FluxClient`` never loads the agent's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core.errors import (
    CheckpointError,
    ConfigError,
    DataIsolationError,
    FluxError,
    TerminalError,
    TransientError,
    ValidationError,
)
from .core.settings import AgentConfig, load_config

if TYPE_CHECKING:
    from .agent import Agent
    from .client import AsyncFluxClient, FluxClient

_LAZY = {"Agent": ".agent", "FluxClient": ".client", "AsyncFluxClient": ".client"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flux_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "Agent",
    "AgentConfig",
    "AsyncFluxClient",
    "CheckpointError",
    "ConfigError",
    "DataIsolationError",
    "FluxClient",
    "FluxError",
    "TerminalError",
    "TransientError",
    "ValidationError",
    "__version__",
    "load_config",
]
