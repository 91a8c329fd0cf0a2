"""flux-agent: an embeddable asyncio sidecar that takes ETL step events on localhost, spools
them durably, and delivers them to PostgreSQL exactly once.

Public API: :class:`Agent`, :class:`AgentConfig`, :func:`load_config` and the error tree.
"""

from ._version import __version__
from .agent import Agent
from .config import AgentConfig, load_config
from .errors import (
    CheckpointError,
    ConfigError,
    DataIsolationError,
    FluxError,
    TerminalError,
    TransientError,
    ValidationError,
)

__all__ = [
    "Agent",
    "AgentConfig",
    "CheckpointError",
    "ConfigError",
    "DataIsolationError",
    "FluxError",
    "TerminalError",
    "TransientError",
    "ValidationError",
    "__version__",
    "load_config",
]
