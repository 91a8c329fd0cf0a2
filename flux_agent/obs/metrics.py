"""Prometheus metrics, one registry per Agent (two agents in one process never collide).

Things that happen (requests, rejections) are counted where they happen. Things that *are*
(spool depth, backlog, flusher totals, PostgreSQL up) are read at scrape time by a collector,
so the hot path pays nothing for them. Label values are bounded: routes are route
templates, agencies come from the manifest, reasons are error codes. No label is named as one
Prometheus gives a scrape target (`endpoint`, `job`, `instance`, `namespace`, `pod`,
`container`, `service`): under prometheus-operator such a label would be renamed
`exported_<name>` and the rules would match the target's instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._version import __version__
from .supervise import Task

REQUEST_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2, 5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Gauge:
    name: str
    doc: str
    kind: str = "gauge"  # or "counter" (a monotonic total read at scrape time)
    label: str = ""  # when set, the value is a mapping label value -> number


# Scrape-time values: name -> description. The agent supplies a callable returning them.
STATE: tuple[Gauge, ...] = (
    Gauge("flux_events_flushed", "Events inserted into PostgreSQL.", "counter"),
    Gauge("flux_events_dead_lettered", "Events PostgreSQL refused, stored as dead letters.",
          "counter"),
    Gauge("flux_flush_batches", "Batches committed to PostgreSQL.", "counter"),
    Gauge("flux_flush_retries", "Flush attempts that failed and were retried.", "counter"),
    Gauge("flux_spool_bytes", "Bytes held by spool segments."),
    Gauge("flux_spool_max_bytes", "Spool capacity."),
    Gauge("flux_spool_segments", "Spool segment files."),
    Gauge("flux_spool_backlog_records", "Spooled records (requests) not yet in PostgreSQL."),
    Gauge("flux_spool_oldest_unflushed_age_seconds",
          "Age of the oldest segment holding unflushed records."),
    Gauge("flux_spool_memory_queue_bytes", "Bytes of records the flusher holds in memory."),
    Gauge("flux_spool_quarantined_segments", "Damaged segments moved aside at start.", "counter"),
    Gauge("flux_spool_torn_tails", "Interrupted appends cut off at start.", "counter"),
    Gauge("flux_spool_corrupt_records", "Records skipped for a bad checksum while reading.",
          "counter"),
    Gauge("flux_spool_write_errors", "Spool writes the disk refused.", "counter"),
    Gauge("flux_spool_cursor_errors", "Spool cursor writes the disk refused (replay grows).",
          "counter"),
    Gauge("flux_spool_read_errors", "Spool reads that failed and were retried.", "counter"),
    Gauge("flux_spool_writable", "1 while the spool accepts writes (0: full disk, no "
          "descriptors, failing device)."),
    Gauge("flux_spool_retained_bytes", "Committed segments kept for a failover replay."),
    Gauge("flux_spool_retained_evicted", "Committed segments dropped before their failover "
          "window ended, for room.", "counter"),
    Gauge("flux_failover_replays", "Replays started after connecting to a new primary.",
          "counter"),
    Gauge("flux_failover_restored_events", "Replayed events the new primary did not have.",
          "counter"),
    Gauge("flux_postgres_up", "1 when the last PostgreSQL operation succeeded, else 0."),
    Gauge("flux_upstream_up", "A sidecar forwarding to aggregators: 1 when the last call to "
          "one succeeded, else 0."),
    Gauge("flux_flush_stalled_seconds", "Seconds without flush progress while events wait."),
    Gauge("flux_ready", "1 while the agent accepts events."),
    Gauge("flux_checkpoint_queue_depth", "Checkpoint saves not yet in PostgreSQL."),
    Gauge("flux_active_runs", "Runs started and not yet completed, failed or aborted.",
          "gauge", "agency"),
    Gauge("flux_retention_purged_rows", "Expired rows deleted by retention.", "counter",
          "table"),
    # Partitions of flux.events: the gauges come from the agent holding the retention lease
    # (absent elsewhere), the counters count what this agent did.
    Gauge("flux_event_partitions", "Time ranges of flux.events (each with one partition per "
          "agency)."),
    Gauge("flux_event_partitions_ahead_seconds", "How far the newest time partition of "
          "flux.events reaches beyond now."),
    Gauge("flux_event_partition_rows_outside", "Rows outside the time partitions, deleted row "
          "by row: default (ids whose time has no partition; counted up to 1e6), unkeyed (ids "
          "without a time, rows from before partitioning; estimated).", "gauge", "partition"),
    Gauge("flux_event_partitions_created", "Partitions of flux.events this agent created.",
          "counter"),
    Gauge("flux_event_partitions_dropped", "Expired partitions of flux.events this agent "
          "dropped.", "counter"),
    Gauge("flux_event_partition_moved_rows", "Rows moved from a default partition into a "
          "partition created for them.", "counter"),
    Gauge("flux_event_partition_lock_timeouts", "Partition changes that gave up waiting for "
          "their lock (tried again next round).", "counter"),
)

_STATE_NAMES = frozenset(g.name for g in STATE)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        values = self._read()
        unknown = values.keys() - _STATE_NAMES
        if unknown:  # a misspelled name would otherwise be a metric that never appears
            raise KeyError(f"state values without a declared gauge: {sorted(unknown)}")
        for g in STATE:
            if g.name not in values:
                continue
            family: Metric
            kind = CounterMetricFamily if g.kind == "counter" else GaugeMetricFamily
            if g.label:
                family = kind(g.name, g.doc, labels=[g.label])
                for label_value, number in sorted(values[g.name].items()):
                    family.add_metric([label_value], number)
            else:
                family = kind(g.name, g.doc, value=values[g.name])
            yield family
        info = GaugeMetricFamily("flux_build_info", "Build of this agent.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "flux_requests", "HTTP requests by route, status and agency.",
            ["route", "status", "agency"], registry=r,
        )
        self.errors = Counter(
            "flux_errors", "Error answers by class and agency.", ["error_class", "agency"],
            registry=r,
        )
        self.request_duration = Histogram(
            "flux_request_duration_seconds", "Time to answer a request.", ["route"],
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.events_accepted = Counter(
            "flux_events_accepted", "Events accepted onto the spool.", ["agency"], registry=r
        )
        self.records_received = Counter(
            "flux_records_received", "Requests of sealed records an aggregator took from "
            "sidecars, by the caller's agency.", ["agency"], registry=r,
        )
        self.events_duplicate = Counter(
            "flux_events_duplicates",
            "Events already known: at intake (index) or by PostgreSQL (conflict).",
            ["detected_by"], registry=r,
        )
        self.events_rejected = Counter(
            "flux_events_rejected", "Requests refused, by error code.", ["reason"], registry=r
        )
        self.checkpoints_saved = Counter(
            "flux_checkpoints_saved", "Checkpoint saves by outcome.", ["success"], registry=r
        )
        self.checkpoint_size = Histogram(
            "flux_checkpoint_size_bytes", "Size of saved checkpoint states (canonical JSON).",
            buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576), registry=r,
        )
        self.checkpoint_integrity_failures = Counter(
            "flux_checkpoint_integrity_failures", "Loads refused because the state did not "
            "match its hash.", registry=r,
        )
        self.audit_dropped = Counter(
            "flux_audit_dropped", "Audit entries not written, by reason.", ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "flux_flush_batch_size_events", "Events per committed flush window.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 4000, 8000), registry=r,
        )
        self.task_failures = Counter(
            "flux_task_failures", "Background task failures (each logged, then restarted).",
            ["task"], registry=r,
        )
        self.flush_duration = Histogram(
            "flux_flush_duration_seconds", "Time to commit one flush window.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

        self._answered: dict[tuple[str, int, str], Any] = {}
        self._durations: dict[str, Any] = {}
        # Memory and CPU of the agent process (process_resident_memory_bytes, ...).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def known_labels(self, agencies: Iterable[str]) -> None:
        """Create the series whose labels are known in advance, at zero: increase() and
        rate() then see an agency's or a class's first event instead of missing it."""
        for agency in agencies:
            self.events_accepted.labels(agency)
            self.records_received.labels(agency)
            for error_class in ("VALIDATION_ERROR", "TRANSIENT_ERROR", "TERMINAL_ERROR",
                                "DATA_ISOLATION_ERROR", "CHECKPOINT_ERROR"):
                self.errors.labels(error_class, agency)
        for detected_by in ("intake", "database"):
            self.events_duplicate.labels(detected_by)
        for success in ("true", "false"):
            self.checkpoints_saved.labels(success)
        for reason in ("rate_limited", "spool_unavailable"):
            self.audit_dropped.labels(reason)
        for task in Task:
            self.task_failures.labels(task.value)

    def answered(self, route: str, status: int, agency: str, seconds: float) -> None:
        """One HTTP answer on ``route`` (a route template). Label children are cached:
        ``labels()`` costs microseconds."""
        key = (route, status, agency)
        child = self._answered.get(key)
        if child is None:
            child = self._answered[key] = self.requests.labels(route, str(status), agency)
        child.inc()
        hist = self._durations.get(route)
        if hist is None:
            hist = self._durations[route] = self.request_duration.labels(route)
        hist.observe(seconds)

    def add_state(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self.registry.register(_StateCollector(read))

    def observe_flush(self, events: int, seconds: float, duplicates: int) -> None:
        self.batch_size.observe(events)
        self.flush_duration.observe(seconds)
        if duplicates:
            self.events_duplicate.labels("database").inc(duplicates)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
