"""Runs started and not yet ended, per agency (the ``flux_active_runs`` gauge)."""

from __future__ import annotations

from collections import OrderedDict

from ..core.event import Row


class RunTracker:
    """Runs started and not yet ended, per agency (for flux_active_runs). Bounded: a run
    that never reports its end is forgotten after ``capacity`` newer ones."""

    TERMINAL = frozenset({"run.completed", "run.failed", "run.aborted"})

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.active: dict[str, OrderedDict[str, None]] = {}

    def observe(self, rows: list[Row]) -> None:
        for row in rows:
            kind = row.kind
            if kind == "run.started":
                runs = self.active.setdefault(row.agency_id, OrderedDict())
                runs[row.run_id] = None
                if len(runs) > self.capacity:
                    runs.popitem(last=False)
            elif kind in self.TERMINAL and row.agency_id in self.active:
                self.active[row.agency_id].pop(row.run_id, None)

    def counts(self) -> dict[str, int]:
        return {agency: len(runs) for agency, runs in self.active.items()}

