"""A control character anywhere in any string field is refused at every entry point.

Python's ``$`` matches before a trailing newline, so ``order_id "x…\\n"`` once
passed the agent, the bridge and the pipeline. For every string field of the
contract (order_id, device_id, currency, sku, attrs keys and values) and any
C0/C1 control character at any position, trailing included:

* the bridge's decode path (:func:`bridge.ingest.classify`) dead-letters it;
* the agent's Python API (:meth:`EdgeAgent.validate`) raises InvalidOrder;
* the agent's HTTP intake answers 4xx and stores nothing;
* the orders API answers 400 for an id path parameter carrying it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.ingest import DeadLetter, classify
from edge_agent import AgentConfig, EdgeAgent, InvalidOrder
from schemas.names import orders_topic

from .conftest import CASES, READ_TOKEN, SLOW
from .live import HttpClient, ServiceProcess
from .strategies import quoted

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)] if SLOW else []
DEVICE = "ctl-dev"
FIELDS = ("order_id", "device_id", "currency", "sku", "attr_key", "attr_value")
# Every C0 and C1 control character.
controls = st.sampled_from([chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]])


def spiked_order(field: str, char: str, at: int) -> dict[str, Any]:
    """A valid wire order with ``char`` inserted into ``field`` at position ``at``."""
    values = {
        "order_id": f"ord-{uuid.uuid4().hex[:10]}",
        "device_id": DEVICE,
        "currency": "EUR",
        "sku": "cola-330",
        "attr_key": "lane",
        "attr_value": "3",
    }
    text = values[field]
    values[field] = text[: at % (len(text) + 1)] + char + text[at % (len(text) + 1) :]
    return {
        "v": 1, "order_id": values["order_id"], "device_id": values["device_id"], "seq": 1,
        "created_at": 1_700_000_000_000, "currency": values["currency"],
        "items": [{"sku": values["sku"], "qty": 1, "unit_price": 150}], "total": 150,
        "attrs": {values["attr_key"]: values["attr_value"]},
    }  # fmt: skip


def intake_body(order: dict[str, Any]) -> dict[str, Any]:
    """What an app posts: the wire order without the fields the agent sets."""
    return {k: v for k, v in order.items() if k not in ("v", "device_id", "seq", "created_at")}


@pytest.fixture(scope="module")
def python_api_agent(tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    """An agent used through its Python API only (validate needs no open outbox)."""
    db = tmp_path_factory.mktemp("ctl-agent") / "outbox.db"
    return EdgeAgent(AgentConfig(device_id=DEVICE, db=str(db), http_enabled=False))


def test_a_control_character_is_refused_everywhere(
    python_api_agent: EdgeAgent, agent_server: ServiceProcess, api_server: ServiceProcess
) -> None:
    """CASES spiked orders (10,000 with HOSTILE_SLOW=1): bridge, agent API and HTTP, orders API."""
    agent_http = HttpClient(agent_server.port)
    orders_api = HttpClient(api_server.port)
    seen: list[int] = []

    @given(field=st.sampled_from(FIELDS), char=controls, at=st.integers(0, 80))
    @settings(
        max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(field: str, char: str, at: int) -> None:
        seen.append(1)
        order = spiked_order(field, char, at)
        # Bridge decode path: the topic carries the clean device id.
        payload = bytes(msgpack.packb(order, use_bin_type=True))
        routed = classify(orders_topic(DEVICE), payload, shards=4, received_at_ms=1)
        assert isinstance(routed, DeadLetter), (field, repr(char))
        assert routed.reason in ("invalid_schema", "device_mismatch")
        # Agent Python API (device_id is the agent's own; the others come from the app).
        if field != "device_id":
            with pytest.raises(InvalidOrder):
                python_api_agent.validate(intake_body(order))
            # Agent HTTP intake.
            answer = agent_http.request(
                "POST",
                "/v1/orders",
                json.dumps(intake_body(order)).encode(),
                {"Host": "localhost", "Content-Type": "application/json"},
            )
            assert answer.status == 422, answer.body[:200]
            assert json.loads(answer.body)["reason"] == "invalid_schema"
        # Orders API: the ids are path parameters there.
        if field in ("order_id", "device_id"):
            path = f"/v1/devices/{quoted(order['device_id'])}/orders/{quoted(order['order_id'])}"
            answer = orders_api.request(
                "GET", path, None, {"Authorization": f"Bearer {READ_TOKEN}"}
            )
            assert answer.status == 400, answer.body[:200]
            assert json.loads(answer.body)["code"] == "invalid-parameter"

    try:
        check()
    finally:
        agent_http.close()
        orders_api.close()
    assert len(seen) >= CASES
