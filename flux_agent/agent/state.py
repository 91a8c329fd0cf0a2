"""The attributes :class:`~flux_agent.agent.Agent` sets in ``__init__`` and ``start()``,
declared once: the mixins that read them (the supervised loops, the probes) inherit this
class, so the type checker knows them and no declaration is repeated."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..checkpoints.ledger import Checkpoints
    from ..core.settings import AgentConfig
    from ..flush.flusher import Flusher
    from ..intake.app import Intake
    from ..intake.seen import SeenIndex
    from ..obs.metrics import Metrics
    from ..obs.supervise import Supervisor
    from ..postgres.embedded import LocalPostgres
    from ..postgres.pool import Postgres
    from ..postgres.sink import PartitionStats, Sink
    from ..spool import Spool


class AgentState:
    config: AgentConfig
    metrics: Metrics
    supervisor: Supervisor
    started_at: float
    spool: Spool | None
    pg: Postgres | None
    sink: Sink | None
    flusher: Flusher | None
    intake: Intake | None
    checkpoints: Checkpoints | None
    seen: SeenIndex
    retention_rounds: int
    purged: dict[str, int]
    partition_counts: dict[str, int]
    partition_stats: PartitionStats | None
    partition_stats_at: float
    embedded_restarts: int
    _embedded: LocalPostgres | None
    _snapshot_warned: bool
    _state: str
