"""One trace per order: W3C trace context, and OpenTelemetry spans when tracing is on.

An order's ``traceparent`` (W3C Trace Context, version ``00``) is born at the
agent's intake, stored with the order in the outbox, sent as the MQTT 5 user
property ``traceparent`` of each order PUBLISH, written by the bridge as the
stream field ``trace``, and continued by the pipeline. Services call the
helpers here from small hooks; all the OpenTelemetry code is in this module.

Tracing is on in a process once its entrypoint calls :func:`configure` with an
OTLP/HTTP endpoint. Off (the default), nothing of OpenTelemetry is imported,
the span helpers return shared no-op objects, and a traceparent is a string
passed through untouched.

An order carries a traceparent only when its trace is sampled or its caller
sent one (:func:`intake_span`): with tracing off the intake makes one, flagged
sampled, for a share ``sample_ratio`` of the orders without a caller's header
(two random ids formatted, ~1 µs), and none for the rest, so a fleet that
samples 1 % sends, stores and reads trace context for 1 % of its orders and
"tracing off" costs the cloud nothing for the others (issue 25: carrying a
55-byte context on every order cost the bridge 4–20 % CPU per order). An
unsampled trace has no spans downstream (sampling is parent-based), so nothing
is lost by not carrying it; a caller's header is always carried, sampled or
not, because it is the caller's trace.

Sampling is parent-based: a span with a parent (a traceparent from upstream)
is recorded when the parent's ``sampled`` flag is set. A root span is recorded
with probability ``sample_ratio`` (by trace id), and a bridge batch span, a
root with a link per order, whenever one of its orders is sampled. Spans are
exported in batches by a background thread (``BatchSpanProcessor``;
``OTEL_BSP_*`` variables tune it); :func:`shutdown` flushes them.

Only ``traceparent`` travels; ``tracestate`` is dropped.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, SpanKind, Tracer

__all__ = [
    "TRACEPARENT_HEADER",
    "PendingSpans",
    "SpanHandle",
    "batch_span",
    "configure",
    "enabled",
    "extract",
    "inject",
    "intake_span",
    "is_sampled",
    "new_traceparent",
    "pending_spans",
    "per_order_spans",
    "plausible_traceparent",
    "shutdown",
    "trace_id",
    "valid_traceparent",
]

TRACEPARENT_HEADER: Final = "traceparent"
TRACES_PATH: Final = "/v1/traces"
INSTRUMENTATION_NAME: Final = "iot-orders"
# version 00: trace id, parent span id (neither all zero: checked apart, cheaper), flags.
_TRACEPARENT_RE: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_SPAN_ID: Final = "0" * 16
_TRACEPARENT_LEN: Final = 55
_SAMPLED_DIGITS: Final = frozenset("13579bdf")  # the low bit of the flags' last hex digit

TraceparentLike = str | bytes | None
"""A traceparent as it arrives: a header or user property (str), a stream field (bytes), none."""


# --- the traceparent string ---------------------------------------------------------


def valid_traceparent(value: TraceparentLike) -> str | None:
    """``value`` when it is a well-formed version-00 traceparent, else None (never raises).

    Input from devices and apps is untrusted; W3C says to ignore a bad one.
    """
    if value is None or len(value) != _TRACEPARENT_LEN:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if (
        _TRACEPARENT_RE.fullmatch(value) is None
        or value.startswith(_ZERO_TRACE_ID, 3)
        or value.startswith(_ZERO_SPAN_ID, 36)
    ):
        return None
    return value


def plausible_traceparent(value: str | None) -> str | None:
    """``value`` when it has a traceparent's shape: 55 ASCII characters, ``00-`` and two dashes.

    The bridge's check for every order (about 0.1 µs, a fifth of
    :func:`valid_traceparent`): the stream field ``trace`` never holds anything
    longer or wider; code that makes a span context of it validates it in full.
    """
    if (
        value is None
        or len(value) != _TRACEPARENT_LEN
        or value[2] != "-"
        or value[35] != "-"
        or value[52] != "-"
        or value[0] != "0"
        or value[1] != "0"
        or not value.isascii()
    ):
        return None
    return value


def new_traceparent(*, sampled: bool) -> str:
    """A traceparent with fresh random trace and span ids (not cryptographic, like OTel's)."""
    trace = random.getrandbits(128) or 1
    span = random.getrandbits(64) or 1
    return f"00-{trace:032x}-{span:016x}-{'01' if sampled else '00'}"


def is_sampled(traceparent: str) -> bool:
    """Whether a valid traceparent's ``sampled`` flag is set."""
    return traceparent[-1] in _SAMPLED_DIGITS


def trace_id(traceparent: str) -> str:
    """The 32 hex digits of a valid traceparent's trace id."""
    return traceparent[3:35]


def extract(carrier: Mapping[str, str]) -> str | None:
    """The valid traceparent in a header mapping (aiohttp's is case-insensitive), else None."""
    return valid_traceparent(carrier.get(TRACEPARENT_HEADER))


def inject(carrier: dict[str, str], traceparent: str | None) -> dict[str, str]:
    """Put ``traceparent`` into a header mapping (nothing when None); return the mapping."""
    if traceparent is not None:
        carrier[TRACEPARENT_HEADER] = traceparent
    return carrier


# --- state --------------------------------------------------------------------------


class _On:
    """What :func:`configure` set up: the provider and our tracer."""

    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self.provider = provider
        self.tracer = tracer


_on: _On | None = None
_ratio = 1.0  # the sampling ratio of traceparents made while tracing is off


def enabled() -> bool:
    """Whether spans are recorded and exported in this process."""
    return _on is not None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector endpoint (``/v1/traces`` added if missing)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def configure(
    endpoint: str,
    *,
    sample_ratio: float,
    service_name: str,
    attributes: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Set up tracing for this process once, from its entrypoint; return whether it is on.

    Args:
        endpoint: the OTLP/HTTP collector, e.g. ``http://127.0.0.1:4318`` (``/v1/traces``
            is added); empty: tracing off and OpenTelemetry never imported.
        sample_ratio: probability (0..1) that a root span is recorded; while
            off, of the ``sampled`` flag of traceparents made here.
        service_name: the ``service.name`` resource attribute.
        attributes: more resource attributes (``service.instance.id``, …).
        exporter: an exporter to use instead of OTLP (tests).

    Raises:
        ValueError: ``sample_ratio`` is outside 0..1.
    """
    global _on, _ratio  # noqa: PLW0603 - one tracer per process, set by the entrypoint
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"trace sample ratio must be in 0..1, not {sample_ratio}")
    shutdown()
    _ratio = sample_ratio
    if not endpoint and exporter is None:
        return False
    # Imported here only: with tracing off the process never loads the SDK.
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.sampling import ParentBased  # noqa: PLC0415

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    provider = TracerProvider(
        sampler=ParentBased(root=_linked_or_ratio(sample_ratio)),
        resource=resource,
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _on = _On(provider, provider.get_tracer(INSTRUMENTATION_NAME))
    return True


def shutdown() -> None:
    """Export what is buffered and switch tracing off (entrypoints call it at exit)."""
    global _on
    on, _on = _on, None
    if on is not None:
        on.provider.shutdown()


def _linked_or_ratio(ratio: float) -> Any:
    """The root sampler: sampled when a link is (a bridge batch), else by trace-id ratio."""
    from opentelemetry.sdk.trace.sampling import (  # noqa: PLC0415
        Decision,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )

    class LinkedOrRatio(Sampler):
        def __init__(self) -> None:
            self._ratio = TraceIdRatioBased(ratio)

        def should_sample(  # noqa: PLR0917 - the SDK's signature
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Any = None,
            links: Sequence[Any] | None = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            if links and any(link.context.trace_flags.sampled for link in links):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return self._ratio.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"LinkedOrRatio{{{ratio}}}"

    return LinkedOrRatio()


# --- contexts (tracing on) ----------------------------------------------------------


def _span_context(traceparent: str) -> SpanContext:
    from opentelemetry.trace import SpanContext, TraceFlags  # noqa: PLC0415

    return SpanContext(
        trace_id=int(traceparent[3:35], 16),
        span_id=int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(traceparent[53:55], 16)),
    )


def _parent(traceparent: str | None) -> Context | None:
    """The OTel context whose remote parent is ``traceparent`` (None: a root span)."""
    if traceparent is None:
        return None
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context  # noqa: PLC0415

    return set_span_in_context(NonRecordingSpan(_span_context(traceparent)))


def _traceparent_of(span: Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _kind(name: str) -> SpanKind:
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    return SpanKind[name]


def _set_error(span: Span, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

    span.set_status(Status(StatusCode.ERROR, description))


# --- the intake span ----------------------------------------------------------------


class SpanHandle(Protocol):
    """The span a hook is inside: the traceparent to pass on, and attributes to add."""

    @property
    def traceparent(self) -> str | None:
        """The order's traceparent, None when its trace is not sampled and nobody sent one."""

    def set(self, key: str, value: str | int | bool) -> None:
        """Add an attribute (a no-op when tracing is off)."""

    def fail(self, description: str) -> None:
        """Mark the span as failed (a no-op when tracing is off)."""


class _OffHandle:
    __slots__ = ("traceparent",)

    def __init__(self, traceparent: str | None) -> None:
        self.traceparent = traceparent

    def set(self, key: str, value: str | int | bool) -> None:
        pass

    def fail(self, description: str) -> None:
        pass


class _SpanHandle:
    __slots__ = ("_span", "traceparent")

    def __init__(self, span: Span, *, upstream: bool) -> None:
        self._span = span
        made = _traceparent_of(span)
        self.traceparent: str | None = made if upstream or is_sampled(made) else None

    def set(self, key: str, value: str | int | bool) -> None:
        self._span.set_attribute(key, value)

    def fail(self, description: str) -> None:
        _set_error(self._span, description)


@contextlib.contextmanager
def intake_span(upstream: TraceparentLike, name: str = "order intake") -> Iterator[SpanHandle]:
    """The span of an order's intake, child of ``upstream`` (an HTTP ``traceparent``) if valid.

    The handle's ``traceparent`` is the order's: store it with the order.
    With tracing off it is ``upstream`` when valid, else, with probability
    ``sample_ratio``, a new sampled one, else None. With tracing on it is the
    span's when ``upstream`` is valid or the span is sampled, else None.
    """
    parent = valid_traceparent(upstream)
    on = _on
    if on is None:
        if parent is None and random.random() < _ratio:
            parent = new_traceparent(sampled=True)
        yield _OffHandle(parent)
        return
    with on.tracer.start_as_current_span(
        name, context=_parent(parent), kind=_kind("SERVER"), record_exception=True
    ) as span:
        yield _SpanHandle(span, upstream=parent is not None)


# --- spans that end later: publish → receipt ----------------------------------------


class PendingSpans(Protocol):
    """Spans keyed by an id that start now and end when an answer comes (publish → receipt)."""

    def begin(self, key: str, parent: str | None) -> str | None:
        """Start ``key``'s span as a child of ``parent``; return the traceparent to send."""

    def end(self, key: str, outcome: str, *, failed: bool = False) -> None:
        """End ``key``'s span (if any) with an ``outcome`` attribute."""

    def end_all(self, outcome: str) -> None:
        """End every open span (connection lost: no answer will come)."""


class _OffPending:
    def begin(self, key: str, parent: str | None) -> str | None:
        return parent

    def end(self, key: str, outcome: str, *, failed: bool = False) -> None:
        pass

    def end_all(self, outcome: str) -> None:
        pass


_OFF_PENDING: Final = _OffPending()


class _Pending:
    """Open spans by key; at most ``limit`` (the oldest is ended past it)."""

    def __init__(self, tracer: Tracer, name: str, kind: str, key_attribute: str, limit: int):
        self._tracer = tracer
        self._name = name
        self._kind = _kind(kind)
        self._key_attribute = key_attribute
        self._limit = limit
        self._open: dict[str, Span] = {}

    def begin(self, key: str, parent: str | None) -> str | None:
        self.end(key, "superseded")
        span = self._tracer.start_span(
            self._name,
            context=_parent(parent),
            kind=self._kind,
            attributes={self._key_attribute: key},
        )
        if not span.is_recording():
            return parent  # not sampled: keep the order's own context on the wire
        if len(self._open) >= self._limit:
            self.end(next(iter(self._open)), "evicted")
        self._open[key] = span
        return _traceparent_of(span)

    def end(self, key: str, outcome: str, *, failed: bool = False) -> None:
        span = self._open.pop(key, None)
        if span is None:
            return
        span.set_attribute("outcome", outcome)
        if failed:
            _set_error(span, outcome)
        span.end()

    def end_all(self, outcome: str) -> None:
        for key in list(self._open):
            self.end(key, outcome, failed=True)


def pending_spans(
    name: str, *, kind: str = "PRODUCER", key_attribute: str = "order.id", limit: int = 10_000
) -> PendingSpans:
    """A :class:`PendingSpans` (a shared no-op while tracing is off)."""
    on = _on
    if on is None:
        return _OFF_PENDING
    return _Pending(on.tracer, name, kind, key_attribute, limit)


# --- batch spans ---------------------------------------------------------------------

_NO_SPAN: Final = contextlib.nullcontext()


def batch_span(
    name: str,
    orders: Iterable[tuple[TraceparentLike, Mapping[str, str]]],
    *,
    kind: str = "CONSUMER",
) -> contextlib.AbstractContextManager[object]:
    """A span around one batch, linked to each sampled order's context.

    ``orders`` is consumed only while tracing is on: pass a generator so that
    tracing off costs nothing per order. Each pair is a traceparent and the
    link's attributes. Unsampled orders get no link (their traces are never
    recorded); the span is recorded when at least one order is sampled.
    """
    on = _on
    if on is None:
        return _NO_SPAN
    from opentelemetry.trace import Link  # noqa: PLC0415

    links = []
    for raw, attributes in orders:
        traceparent = valid_traceparent(raw)
        if traceparent is not None and is_sampled(traceparent):
            links.append(Link(_span_context(traceparent), dict(attributes)))
    return on.tracer.start_as_current_span(
        name,
        context=_root_context(),
        kind=_kind(kind),
        links=links,
        attributes={"batch.orders_linked": len(links)},
    )


def _root_context() -> Context:
    from opentelemetry.context import Context  # noqa: PLC0415

    return Context()  # no parent, whatever span is current


@contextlib.contextmanager
def _fan_out(
    on: _On, name: str, orders: Iterable[tuple[TraceparentLike, Mapping[str, str]]], kind: str
) -> Iterator[object]:
    started_ns = time.time_ns()
    yield None
    ended_ns = time.time_ns()
    span_kind = _kind(kind)
    for raw, attributes in orders:
        traceparent = valid_traceparent(raw)
        if traceparent is None or not is_sampled(traceparent):
            continue
        span = on.tracer.start_span(
            name,
            context=_parent(traceparent),
            kind=span_kind,
            attributes=dict(attributes),
            start_time=started_ns,
        )
        span.end(end_time=ended_ns)


def per_order_spans(
    name: str,
    orders: Iterable[tuple[TraceparentLike, Mapping[str, str]]],
    *,
    kind: str = "INTERNAL",
) -> contextlib.AbstractContextManager[object]:
    """Time a block of batch work, then give each sampled order a span of it in its trace.

    ``orders`` (traceparent, span attributes) is consumed after the block and
    only while tracing is on; pass a generator. Each span is a child of its
    order's context and covers the whole block (a pipeline step runs per batch).
    """
    on = _on
    if on is None:
        return _NO_SPAN
    return _fan_out(on, name, orders, kind)
