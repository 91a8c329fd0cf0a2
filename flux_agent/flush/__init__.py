"""Spool -> windows -> upstream: batching (pure, clock injected), the flusher, and the
Writer protocol its upstreams (PostgreSQL, an aggregator) implement."""
