"""servicekit.tracing: the traceparent string, tracing off (no SDK), and the spans when on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from servicekit import tracing

HEADER_SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HEADER_UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319d-b7ad6b7169203332-00"


@pytest.fixture(autouse=True)
def _off_afterwards() -> Iterator[None]:
    """Every test leaves tracing off, as a process starts."""
    yield
    tracing.shutdown()
    tracing.configure("", sample_ratio=1.0, service_name="test")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Tracing on, exporting to memory; spans are there after ``finished(exporter)``."""
    memory = InMemorySpanExporter()
    assert tracing.configure("", sample_ratio=1.0, service_name="unit", exporter=memory)
    return memory


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """Flush the batch processor and return every exported span."""
    tracing.shutdown()
    return list(exporter.get_finished_spans())


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def parent_span_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


# --- the string ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        HEADER_SAMPLED,
        HEADER_UNSAMPLED,
        HEADER_SAMPLED.encode(),
    ],
)
def test_a_valid_traceparent_is_kept(value: str | bytes) -> None:
    """Version 00 with non-zero ids, as str or as the stream's bytes, is kept as a str."""
    assert tracing.valid_traceparent(value) in {HEADER_SAMPLED, HEADER_UNSAMPLED}


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        HEADER_SAMPLED.upper(),  # W3C: lower-case hex only
        HEADER_SAMPLED + "\n",
        HEADER_SAMPLED[:-1],
        "ff" + HEADER_SAMPLED[2:],  # version ff is invalid; others are not ours
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
        "\xe9" * 55,
        b"\xff" * 55,
    ],
)
def test_a_bad_traceparent_is_none(value: str | bytes | None) -> None:
    """Anything else is ignored (None), never an exception."""
    assert tracing.valid_traceparent(value) is None


@pytest.mark.parametrize(
    ("value", "plausible"),
    [
        (HEADER_SAMPLED, True),
        ("00-" + "g" * 32 + "-" + "0" * 16 + "-zz", True),  # the shape only: validated on use
        (None, False),
        (HEADER_SAMPLED + "0", False),
        ("01" + HEADER_SAMPLED[2:], False),
        (HEADER_SAMPLED[:35] + "_" + HEADER_SAMPLED[36:], False),
        (HEADER_SAMPLED[:52] + "_" + HEADER_SAMPLED[53:], False),
        ("10" + HEADER_SAMPLED[2:], False),
        (HEADER_SAMPLED[:10] + "é" + HEADER_SAMPLED[11:], False),
    ],
)
def test_plausible_traceparent_checks_the_shape(value: str | None, plausible: bool) -> None:
    """The bridge's cheap check: length, version, dashes, ASCII."""
    assert tracing.plausible_traceparent(value) == (value if plausible else None)


def test_new_traceparents_are_valid_unique_and_flagged() -> None:
    """Fresh ids each time; the sampled flag is what was asked."""
    made = {tracing.new_traceparent(sampled=True) for _ in range(1000)}
    assert len(made) == 1000
    assert all(tracing.valid_traceparent(tp) == tp and tracing.is_sampled(tp) for tp in made)
    assert not tracing.is_sampled(tracing.new_traceparent(sampled=False))


def test_trace_id_sampled_extract_and_inject() -> None:
    """The small accessors read the right parts; extract validates."""
    assert tracing.trace_id(HEADER_SAMPLED) == "0af7651916cd43dd8448eb211c80319c"
    assert tracing.is_sampled(HEADER_SAMPLED)
    assert not tracing.is_sampled(HEADER_UNSAMPLED)
    assert tracing.is_sampled(HEADER_SAMPLED[:-2] + "03")  # other flag bits don't matter
    assert tracing.extract({"traceparent": HEADER_SAMPLED}) == HEADER_SAMPLED
    assert tracing.extract({"traceparent": "garbage"}) is None
    assert tracing.extract({}) is None
    assert tracing.inject({}, HEADER_SAMPLED) == {"traceparent": HEADER_SAMPLED}
    assert tracing.inject({}, None) == {}


def test_traces_url_adds_the_path_once() -> None:
    """A collector base URL gets /v1/traces; a full one stays."""
    assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_a_ratio_outside_0_to_1_is_refused() -> None:
    """The sampling ratio is a probability."""
    with pytest.raises(ValueError, match=r"0\.\.1"):
        tracing.configure("", sample_ratio=1.5, service_name="x")


# --- off -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "forbidden"),
    [
        ("edge_agent.cli", ("opentelemetry",)),
        # redis-py imports the OTel API and metrics SDK itself (redis.observability);
        # our trace SDK and exporter stay out.
        ("bridge.cli, pipeline.cli", ("opentelemetry.sdk.trace", "opentelemetry.exporter")),
    ],
)
def test_off_imports_no_tracing_sdk(service: str, forbidden: tuple[str, ...]) -> None:
    """With tracing off, a service process never loads the trace SDK (the agent: no OTel at all)."""
    code = (
        f"import sys, servicekit.tracing as t, {service}\n"
        "t.configure('', sample_ratio=0.5, service_name='x')\n"
        "t.pending_spans('p'); t.batch_span('b', iter(())); t.per_order_spans('s', iter(()))\n"
        "with t.intake_span(None) as s: pass\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({forbidden!r}))\n"
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_off_intake_passes_a_valid_header_through() -> None:
    """Off: the app's traceparent becomes the order's as it is."""
    assert not tracing.enabled()
    with tracing.intake_span(HEADER_UNSAMPLED) as span:
        span.set("order.id", "x")
        span.fail("no-op")
        assert span.traceparent == HEADER_UNSAMPLED


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_off_intake_makes_a_sampled_traceparent_at_the_ratio_and_none_otherwise(
    ratio: float,
) -> None:
    """Off, no (or a bad) header: a new sampled traceparent at the ratio, else none at all
    (an unsampled trace is not carried: issue 25)."""
    tracing.configure("", sample_ratio=ratio, service_name="x")
    for header in (None, "bad"):
        with tracing.intake_span(header) as span:
            made = span.traceparent
        if ratio:
            assert made is not None
            assert tracing.valid_traceparent(made) == made
            assert tracing.is_sampled(made)
        else:
            assert made is None


def test_off_intake_at_one_percent_carries_about_one_in_a_hundred() -> None:
    """Off at 1 %: the share of orders that carry a traceparent is the ratio."""
    tracing.configure("", sample_ratio=0.01, service_name="x")
    carried = 0
    for _ in range(20_000):
        with tracing.intake_span(None) as span:
            carried += span.traceparent is not None
    assert 100 <= carried <= 300  # 200 expected; the binomial's sd is ~14


def test_off_helpers_do_nothing_and_never_consume_their_orders() -> None:
    """Off: pending spans hand the parent back; batch helpers never iterate their input."""
    consumed = []

    def orders() -> Iterator[tuple[str, dict[str, str]]]:
        consumed.append(True)
        yield HEADER_SAMPLED, {}

    pending = tracing.pending_spans("publish")
    assert pending.begin("o1", HEADER_SAMPLED) == HEADER_SAMPLED
    assert pending.begin("o2", None) is None
    pending.end("o1", "accepted")
    pending.end_all("lost")
    with tracing.batch_span("batch", orders()):
        pass
    with tracing.per_order_spans("step", orders()):
        pass
    assert consumed == []


# --- on ------------------------------------------------------------------------------


def test_intake_span_continues_the_apps_trace(exporter: InMemorySpanExporter) -> None:
    """On: the intake span is a child of the header; the order's traceparent is the span's."""
    with tracing.intake_span(HEADER_SAMPLED) as span:
        span.set("order.id", "o1")
        order_tp = span.traceparent
    (intake,) = finished(exporter)
    assert order_tp is not None
    assert intake.name == "order intake"
    assert intake.kind is SpanKind.SERVER
    assert hex_ids(intake) == (order_tp[3:35], order_tp[36:52])
    assert tracing.trace_id(order_tp) == tracing.trace_id(HEADER_SAMPLED)
    assert parent_span_id(intake) == HEADER_SAMPLED[36:52]
    assert intake.attributes == {"order.id": "o1"}
    assert intake.resource.attributes["service.name"] == "unit"


def test_intake_span_without_header_is_a_root(exporter: InMemorySpanExporter) -> None:
    """On, no header: a new trace, recorded at ratio 1."""
    with tracing.intake_span(None) as span:
        span.fail("outbox_full")
        order_tp = span.traceparent
    (intake,) = finished(exporter)
    assert intake.parent is None
    assert order_tp is not None
    assert tracing.is_sampled(order_tp)
    assert intake.status.description == "outbox_full"


def test_on_an_unsampled_root_is_not_carried() -> None:
    """On at ratio 0, no header: no span, and the order carries no traceparent (issue 25)."""
    memory = InMemorySpanExporter()
    assert tracing.configure("", sample_ratio=0.0, service_name="unit", exporter=memory)
    with tracing.intake_span(None) as span:
        order_tp = span.traceparent
    assert order_tp is None
    assert finished(memory) == []


def test_an_unsampled_header_records_nothing_but_keeps_the_trace(
    exporter: InMemorySpanExporter,
) -> None:
    """Parent-based: the app said not sampled, so no span, and the flag travels on."""
    with tracing.intake_span(HEADER_UNSAMPLED) as span:
        order_tp = span.traceparent
    assert order_tp is not None  # the caller's trace is carried, sampled or not
    assert tracing.trace_id(order_tp) == tracing.trace_id(HEADER_UNSAMPLED)
    assert not tracing.is_sampled(order_tp)
    assert finished(exporter) == []


def test_pending_spans_run_from_begin_to_end(exporter: InMemorySpanExporter) -> None:
    """publish → receipt: a child of the order, its context on the wire, ended by outcome."""
    pending = tracing.pending_spans("order publish")
    wire = pending.begin("o1", HEADER_SAMPLED)
    assert wire is not None
    assert tracing.trace_id(wire) == tracing.trace_id(HEADER_SAMPLED)
    assert wire != HEADER_SAMPLED
    second = pending.begin("o2", HEADER_SAMPLED)
    assert pending.begin("o3", HEADER_UNSAMPLED) == HEADER_UNSAMPLED  # not sampled: no span
    pending.end("o1", "accepted")
    pending.end("o1", "accepted")  # twice: nothing more
    pending.end_all("connection_lost")
    spans = {span.attributes["order.id"]: span for span in finished(exporter)}  # type: ignore[index]
    assert set(spans) == {"o1", "o2"}
    assert spans["o1"].attributes["outcome"] == "accepted"  # type: ignore[index]
    assert spans["o1"].kind is SpanKind.PRODUCER
    assert parent_span_id(spans["o1"]) == HEADER_SAMPLED[36:52]
    assert hex_ids(spans["o1"])[1] == wire[36:52]
    assert second is not None
    assert hex_ids(spans["o2"])[1] == second[36:52]
    assert spans["o2"].attributes["outcome"] == "connection_lost"  # type: ignore[index]
    assert not spans["o2"].status.is_ok


def test_pending_spans_are_bounded(exporter: InMemorySpanExporter) -> None:
    """Past the limit the oldest open span is ended (evicted), never kept for ever."""
    pending = tracing.pending_spans("p", limit=2)
    for key in ("a", "b", "c"):
        pending.begin(key, HEADER_SAMPLED)
    outcomes = {s.attributes["order.id"]: s.attributes.get("outcome") for s in finished(exporter)}  # type: ignore[index, union-attr]
    assert outcomes == {"a": "evicted"}


def test_batch_span_links_each_sampled_order(exporter: InMemorySpanExporter) -> None:
    """One root span per batch with a link per sampled order; unsampled and bad ones get none."""
    orders: list[tuple[str | bytes | None, dict[str, str]]] = [
        (HEADER_SAMPLED, {"order.id": "o1"}),
        (HEADER_UNSAMPLED, {"order.id": "o2"}),
        (b"garbage", {"order.id": "o3"}),
        (None, {"order.id": "o4"}),
    ]
    # A current span must not become the batch's parent.
    with tracing.intake_span(None), tracing.batch_span("bridge batch", iter(orders)):
        pass
    batch = next(s for s in finished(exporter) if s.name == "bridge batch")
    assert batch.parent is None
    assert batch.kind is SpanKind.CONSUMER
    assert [
        (f"{link.context.span_id:016x}", dict(link.attributes or {})) for link in batch.links
    ] == [(HEADER_SAMPLED[36:52], {"order.id": "o1"})]
    assert tracing.trace_id(HEADER_SAMPLED) != hex_ids(batch)[0]


def test_a_batch_is_recorded_when_an_order_is_sampled_whatever_the_ratio() -> None:
    """Ratio 0: a batch without sampled orders is dropped, one with a sampled order is kept."""
    memory = InMemorySpanExporter()
    tracing.configure("", sample_ratio=0.0, service_name="unit", exporter=memory)
    with tracing.batch_span("empty", iter([(HEADER_UNSAMPLED, {})])):
        pass
    with tracing.batch_span("linked", iter([(HEADER_SAMPLED, {})])):
        pass
    with tracing.intake_span(None) as span:  # a root at ratio 0: not sampled, not carried
        assert span.traceparent is None
    assert [s.name for s in finished(memory)] == ["linked"]


def test_per_order_spans_give_each_sampled_order_the_blocks_time(
    exporter: InMemorySpanExporter,
) -> None:
    """Batch work timed once, one span per sampled order under that order's context."""
    other = tracing.new_traceparent(sampled=True)
    orders: list[tuple[str | bytes | None, dict[str, str]]] = [
        (HEADER_SAMPLED.encode(), {"order.id": "o1"}),
        (other, {"order.id": "o2"}),
        (HEADER_UNSAMPLED, {"order.id": "o3"}),
        (None, {"order.id": "o4"}),
    ]
    with tracing.per_order_spans("pipeline pay", iter(orders)):
        pass
    spans = sorted(finished(exporter), key=lambda s: str(s.attributes["order.id"]))  # type: ignore[index]
    assert [s.attributes["order.id"] for s in spans] == ["o1", "o2"]  # type: ignore[index]
    assert [parent_span_id(s) for s in spans] == [HEADER_SAMPLED[36:52], other[36:52]]
    assert [hex_ids(s)[0] for s in spans] == [tracing.trace_id(HEADER_SAMPLED), other[3:35]]
    assert spans[0].start_time == spans[1].start_time
    assert spans[0].end_time == spans[1].end_time
    assert spans[0].end_time is not None
    assert spans[0].start_time is not None
    assert spans[0].end_time >= spans[0].start_time
