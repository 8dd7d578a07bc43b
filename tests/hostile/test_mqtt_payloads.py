"""Hostile MQTT payloads on the bridge's decode path: in process, then through a real bridge.

The property runs :func:`bridge.ingest.classify` (topic check, decode, validation)
over CASES payloads and topics; the live test publishes CASES payloads through
a real Mosquitto to a real ``order-bridge`` and counts one receipt each, with
the bridge's RSS flat. ``HOSTILE_SLOW=1``: 10,000 of each.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.ingest import DeadLetter, ValidOrder, classify
from schemas import Reason, decode_order
from schemas.names import orders_topic
from tests.bridge.conftest import BridgeProcess, Publisher, ReceiptCollector
from tests.helpers import wait_until_blocking

from .conftest import CASES, SLOW, rss_slack_bytes
from .live import MemoryWatch
from .strategies import CONTROL_CHARS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)] if SLOW else []
REASONS = {v for k, v in vars(Reason).items() if k.isupper()}
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=12) | st.integers(-(2**63), 2**64 - 1), inner, max_size=5
        )
    ),
    max_leaves=30,
)


def valid_order(device_id: str) -> dict[str, Any]:
    """A valid order as a plain map."""
    return {
        "v": 1, "order_id": f"o-{uuid.uuid4().hex[:12]}", "device_id": device_id, "seq": 1,
        "created_at": 1_700_000_000_000, "currency": "EUR",
        "items": [{"sku": "cola", "qty": 1, "unit_price": 150}], "total": 150, "attrs": {"a": "b"},
    }  # fmt: skip


@st.composite
def mutated_orders(draw: st.DrawFn, device_id: str) -> bytes:
    """A valid order with one field replaced by anything, or a string field spiked."""
    order: Any = valid_order(device_id)
    key = draw(st.sampled_from(sorted(order)))
    if draw(st.booleans()) and isinstance(order[key], str):
        text = order[key]
        at = draw(st.integers(0, len(text)))
        order[key] = text[:at] + draw(CONTROL_CHARS) + text[at:]
    else:
        order[key] = draw(msgpack_values)
    return bytes(msgpack.packb(order, use_bin_type=True))


def payloads(device_id: str) -> st.SearchStrategy[bytes]:
    """Anything a device (or an attacker with its credentials) can publish."""
    return st.one_of(
        st.binary(max_size=400),
        msgpack_values.map(lambda v: bytes(msgpack.packb(v, use_bin_type=True))),
        mutated_orders(device_id),
        st.integers(1, 20_000).map(lambda d: b"\x91" * d + b"\x01"),  # nested arrays
        st.integers(16 * 1024 - 8, 16 * 1024 + 64).map(lambda n: b"\xc4" + b"x" * n),
    )


topics = st.one_of(
    st.just(orders_topic("dev-1")),
    st.text(max_size=80),
    st.builds(lambda d: f"v1/devices/{d}/orders", st.text(max_size=70)),
)


@given(topic=topics, payload=payloads("dev-1"))
@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def _classify_one(topic: str, payload: bytes, seen: list[tuple[str, bytes]]) -> None:
    seen.append((topic, payload))
    result = classify(topic, payload, shards=4, received_at_ms=1)
    if isinstance(result, DeadLetter):
        assert result.reason in REASONS
        assert result.order_id is None or re.fullmatch(r"[A-Za-z0-9_-]{8,64}", result.order_id)
        return
    assert isinstance(result, ValidOrder)
    order = decode_order(result.payload, topic_device_id=result.device_id)
    strings = [order.order_id, order.device_id, order.currency, *order.attrs, *order.attrs.values()]
    strings += [item.sku for item in order.items]
    assert not any(CONTROL_RE.search(s) for s in strings)


def test_classify_routes_every_payload_and_never_raises() -> None:
    """Any topic and payload: an order free of control characters, or a reasoned dead letter.

    RSS is watched over a second pass on the same cases: during the first,
    hypothesis's own records of what it generated grow with the case count
    (140 MB over 10,000 cases) in this very process.
    """
    seen: list[tuple[str, bytes]] = []
    _classify_one(seen=seen)
    assert len(seen) >= CASES
    watch = MemoryWatch(len(seen))
    for topic, payload in seen:
        watch.tick()
        classify(topic, payload, shards=4, received_at_ms=1)
    assert watch.growth() < rss_slack_bytes(watch.count)


def _bridge_rss(bridge: BridgeProcess) -> int:
    assert bridge.process is not None
    status = Path(f"/proc/{bridge.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]


def test_a_real_bridge_receipts_every_hostile_payload(
    tmp_path: Path, mqtt_url: str, redis_url: str
) -> None:
    """CASES generated payloads through Mosquitto: one receipt each, the bridge alive, RSS flat."""
    device_id = f"hostile-{uuid.uuid4().hex[:8]}"
    batch: list[bytes] = []

    @given(payload=payloads(device_id))
    @settings(
        max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def collect(payload: bytes) -> None:
        batch.append(payload)

    collect()
    assert len(batch) >= CASES
    bridge = BridgeProcess(tmp_path, mqtt_url, redis_url)
    receipts = ReceiptCollector(mqtt_url)
    publisher = Publisher(mqtt_url)
    try:
        bridge.start()
        topic = orders_topic(device_id)
        warm = len(batch) // 10

        def mine() -> int:
            return sum(1 for dev, _ in receipts.snapshot() if dev == device_id)

        for payload in batch[:warm]:
            publisher.publish(topic, payload)
        publisher.wait_all()
        wait_until_blocking(lambda: mine() >= warm, 60, "warm-up receipts")
        warm_rss = _bridge_rss(bridge)
        for payload in batch[warm:]:
            publisher.publish(topic, payload)
        publisher.wait_all()
        wait_until_blocking(lambda: mine() >= len(batch), 120, f"receipts\n{bridge.log_tail()}")
        assert mine() == len(batch)
        assert bridge.status("/healthz") == 200
        assert _bridge_rss(bridge) - warm_rss < rss_slack_bytes(len(batch))
        results = {r.result for dev, r in receipts.snapshot() if dev == device_id}
        assert "rejected" in results
    finally:
        publisher.close()
        receipts.close()
        bridge.stop()
