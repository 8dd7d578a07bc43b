"""A real OTLP/HTTP trace receiver for tests: decodes ``ExportTraceServiceRequest`` protobufs.

``with OtlpReceiver() as receiver`` serves it on a free loopback port from
an event loop in a thread of its own, so a test may block while it waits for
processes; ``receiver.endpoint`` is what the services get as ``--otlp-endpoint``.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from testrig.servers import free_port

KINDS = {
    ProtoSpan.SPAN_KIND_INTERNAL: "INTERNAL",
    ProtoSpan.SPAN_KIND_SERVER: "SERVER",
    ProtoSpan.SPAN_KIND_CLIENT: "CLIENT",
    ProtoSpan.SPAN_KIND_PRODUCER: "PRODUCER",
    ProtoSpan.SPAN_KIND_CONSUMER: "CONSUMER",
}


@dataclass(frozen=True)
class Link:
    """A span link as received."""

    trace_id: str
    span_id: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it (ids in lower-case hex; parent '' for a root)."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, str]
    links: list[Link] = field(default_factory=list)
    error: bool = False


def _attributes(pairs: list[KeyValue]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        out[pair.key] = str(getattr(value, kind)) if kind else ""
    return out


class OtlpReceiver:
    """An aiohttp server taking ``POST /v1/traces``; keeps every span it was sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            return list(self._spans)

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        received = []
        for resource_spans in export.resource_spans:
            service = _attributes(list(resource_spans.resource.attributes)).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                received += [_decode(service, span) for span in scope_spans.spans]
        with self._lock:
            self._spans += received
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """Every span of one trace received so far."""
        return [span for span in self.spans if span.trace_id == trace_id]

    def linked_to(self, trace_id: str) -> list[ReceivedSpan]:
        """Spans of other traces that link into ``trace_id`` (bridge batches)."""
        return [s for s in self.spans if any(link.trace_id == trace_id for link in s.links)]

    def wait(self, trace_id: str, *names: str, timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """Wait until spans with each of ``names`` arrived in the trace (or links into it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id) + self.linked_to(trace_id)
            missing = set(names) - {span.name for span in spans}
            if not missing:
                return spans
            if time.monotonic() > deadline:
                got = sorted((s.service, s.name) for s in spans)
                raise AssertionError(f"trace {trace_id}: no span {sorted(missing)}; got {got}")
            time.sleep(0.05)

    def wait_any(
        self,
        name: str,
        where: Callable[[ReceivedSpan], bool] = lambda _: True,
        timeout_s: float = 20.0,
    ) -> list[ReceivedSpan]:
        """Wait until a span named ``name`` (that ``where`` accepts) arrived; all of them."""
        deadline = time.monotonic() + timeout_s
        while not (found := [s for s in self.spans if s.name == name and where(s)]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no span {name!r}")
            time.sleep(0.05)
        return found


def _decode(service: str, span: ProtoSpan) -> ReceivedSpan:
    return ReceivedSpan(
        service=service,
        name=span.name,
        kind=KINDS.get(span.kind, "UNSPECIFIED"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes=_attributes(list(span.attributes)),
        links=[
            Link(link.trace_id.hex(), link.span_id.hex(), _attributes(list(link.attributes)))
            for link in span.links
        ],
        error=span.status.code == span.status.STATUS_CODE_ERROR,
    )
