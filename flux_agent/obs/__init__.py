"""Observability: JSON logs, Prometheus metrics (one registry per agent), OpenTelemetry
traces, and the supervisor of every background task."""
