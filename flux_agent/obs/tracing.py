"""OpenTelemetry traces: a span per request and per flush window.

Off unless configured (``FLUX_AGENT_TRACING=on``, or ``auto`` with OpenTelemetry's own
``OTEL_*`` exporter variables set). When off, nothing of OpenTelemetry is imported and every
hook is a no-op: the request's ids still come from its W3C ``traceparent`` (or are made up),
so stored events and logs carry them either way.

When on: the request span continues the caller's trace; events store its trace and span id;
the flush span of a window links to the spans of the requests whose events it carries, so a
trace viewer can follow an event from the workload to PostgreSQL. What happens inside a
request (its events becoming durable on the spool) is an event of the request's span, not a
span of its own: half the spans to build, record and export per request. Spans are started
without being made OpenTelemetry's current span (the agent keeps its own request context),
which saves attaching and detaching a context per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

MAX_LINKS = 128  # OpenTelemetry's default span link limit
_REQUEST_SPAN: ContextVar[Any] = ContextVar("flux_request_span", default=None)


class Tracing:
    """The hooks the pipeline calls. This base class is the tracing-off no-op."""

    enabled = False

    @contextlib.contextmanager
    def request(self, name: str, traceparent: str | None, ids: tuple[str, str]
                ) -> Iterator[tuple[str, str]]:
        """A server span for one request; yields the (trace_id, span_id) to store."""
        yield ids

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        """Something that happened in the current request (an event of its span)."""

    @contextlib.contextmanager
    def flush(self, events: int, links: Iterable[tuple[str | None, str | None]]
              ) -> Iterator[None]:
        yield

    def shutdown(self) -> None:
        return None


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, exporter: Any = "otlp", service_name: str = "flux-agent") -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
        )
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured by Resource.create.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if isinstance(exporter, str):
            self.provider.add_span_processor(BatchSpanProcessor(make_exporter(exporter)))
        else:  # tests and embedders hand in their own (an in-memory exporter, say)
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("flux_agent")

    @contextlib.contextmanager
    def request(self, name: str, traceparent: str | None, ids: tuple[str, str]
                ) -> Iterator[tuple[str, str]]:
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent \
            else None
        span = self.tracer.start_span(name, context=parent, kind=self._trace.SpanKind.SERVER)
        token = _REQUEST_SPAN.set(span)
        try:
            ctx = span.get_span_context()
            if ctx.is_valid:
                yield f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
            else:  # not sampled: the ids the request came with
                yield ids
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
            raise
        finally:
            _REQUEST_SPAN.reset(token)
            span.end()

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        span = _REQUEST_SPAN.get()
        if span is not None:
            span.add_event(name, attributes)

    @contextlib.contextmanager
    def flush(self, events: int, links: Iterable[tuple[str | None, str | None]]
              ) -> Iterator[None]:
        trace = self._trace
        seen: set[tuple[str, str]] = set()
        span_links = []
        for trace_id, span_id in links:
            if not trace_id or not span_id or (trace_id, span_id) in seen:
                continue
            seen.add((trace_id, span_id))
            span_links.append(trace.Link(trace.SpanContext(
                int(trace_id, 16), int(span_id, 16), is_remote=True,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))))
            if len(span_links) >= MAX_LINKS:
                break
        # A window belongs to no single request: it is a root span of its own, linked to
        # the requests it carries.
        with self.tracer.start_as_current_span(
                "flux.flush", context=trace.set_span_in_context(trace.INVALID_SPAN),
                links=span_links, attributes={"flux.events": events}):
            yield

    def shutdown(self) -> None:
        self.provider.shutdown()


def make_exporter(name: str) -> Any:
    """``otlp`` (OTLP over HTTP; endpoint, headers and timeouts from OpenTelemetry's
    ``OTEL_EXPORTER_OTLP_*`` variables) or ``console`` (for debugging)."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
    except ImportError:
        raise RuntimeError(
            "tracing is on but the OTLP exporter is not installed: "
            "pip install 'flux-etl-agent[otlp]' (in a checkout: pip install -e '.[otlp]'; or set "
            "OTEL_TRACES_EXPORTER=console)"
        ) from None
    return OTLPSpanExporter()


def make_tracing(mode: str, exporter: Any = None) -> Tracing:
    """``mode`` is the resolved FLUX_AGENT_TRACING: ``off``, ``otlp`` or ``console``."""
    if exporter is not None:
        return OtelTracing(exporter)
    if mode in ("otlp", "console"):
        return OtelTracing(mode)
    return Tracing()
