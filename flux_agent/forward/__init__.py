"""The hop from a sidecar to an aggregator: the wire form of sealed records (``wire``),
the replicas behind one client with deadlines and rotation (``upstream``), the flusher's
Writer that forwards windows (``writer``), the Reader that asks an aggregator for runs,
events and checkpoints (``reader``), and what the probes see of it (``health``).

Exactly once across the hop: ids and hashes are fixed at intake, an aggregator answers only
once a record is durable on its own spool, the sidecar moves its cursor only then, and
PostgreSQL's primary keys absorb whatever is sent twice (a retry after a lost answer, a
handoff of a window PostgreSQL had already taken, two replicas)."""
