"""Hostile requests against the agent's HTTP intake: no 5xx, every error a problem, memory flat."""

from __future__ import annotations

import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import CASES, SLOW, rss_slack_bytes
from .live import Answer, HttpClient, MemoryWatch, ServiceProcess
from .strategies import header_text, quoted, raw_bodies

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)] if SLOW else []


def check(answer: Answer, method: str) -> None:
    """No 5xx but the agent's own 503/507 (storage), and every error a problem document."""
    assert answer.status < 500 or answer.status in (503, 507), answer.body[:300]
    if answer.status >= 400 and method != "HEAD":
        assert answer.content_type == "application/problem+json", answer.body[:300]
        problem = json.loads(answer.body)
        assert problem["status"] == answer.status
        assert problem["type"] == f"urn:iot-orders:problem:{problem['code']}"


requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(
            ["POST", "POST", "POST", "GET", "GET", "PUT", "DELETE", "OPTIONS", "HEAD"]
        ),
        "path": st.one_of(
            st.just("/v1/orders"),
            st.builds(lambda s: "/v1/orders/" + quoted(s), st.text(max_size=70)),
            st.sampled_from(["/healthz", "/metrics", "/", "/v1", "/v1/orders/", "//v1/orders"]),
        ),
        "query": st.dictionaries(
            st.sampled_from(["limit", "cursor", "state", "x"]),
            st.one_of(st.text(max_size=30), st.integers(-(2**70), 2**70).map(str)),
            max_size=3,
        ),
        "host": st.sampled_from(
            ["localhost", "127.0.0.1", "[::1]", "kiosk.local", "evil.example", ""]
        ),
        "content_type": st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "text/plain",
                "application/x-www-form-urlencoded",
                "",
                "application/jsonx",
            ]
        ),
        "authorization": st.none() | header_text,
        "body": raw_bodies,
    }
)


@given(request=requests)
@settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def _fuzz(request: dict[str, object], client: HttpClient, watch: MemoryWatch) -> None:
    watch.tick()
    method = str(request["method"])
    query = urllib.parse.urlencode(request["query"])  # type: ignore[arg-type]
    path = str(request["path"]) + (f"?{query}" if query else "")
    host = str(request["host"])
    headers = {"Host": f"{host}:{client_port(client)}" if host else "localhost"}
    if request["content_type"]:
        headers["Content-Type"] = str(request["content_type"])
    if request["authorization"] is not None:
        headers["Authorization"] = str(request["authorization"])
    body = request["body"] if method in ("POST", "PUT") else None
    assert body is None or isinstance(body, bytes)
    check(client.request(method, path, body, headers), method)


def client_port(client: HttpClient) -> int:
    """The port a client talks to (for the Host header)."""
    return client._port


def test_hostile_requests_get_no_5xx_and_memory_stays_flat(agent_server: ServiceProcess) -> None:
    """CASES generated requests (10,000 with HOSTILE_SLOW=1): no 5xx, problems only, RSS flat."""
    client = HttpClient(agent_server.port)
    watch = MemoryWatch(CASES, agent_server.rss)
    try:
        _fuzz(client=client, watch=watch)
    finally:
        client.close()
    assert watch.count >= CASES
    assert watch.growth() < rss_slack_bytes(watch.count)
    # The server is still healthy after all of it.
    after = HttpClient(agent_server.port)
    assert after.request("GET", "/healthz", headers={"Host": "localhost"}).status in (200, 503)
    after.close()


def test_the_known_500s_are_gone(agent_server: ServiceProcess) -> None:
    """The three inputs the issue measured as 500s now answer 4xx problems."""
    client = HttpClient(agent_server.port)
    json_headers = {"Host": "localhost", "Content-Type": "application/json"}
    deep = client.request("POST", "/v1/orders", b"[" * 32_000 + b"]" * 32_000, json_headers)
    big = json.dumps(
        {"currency": "EUR", "items": [{"sku": "a", "qty": 1, "unit_price": 2**64}], "total": 2**64}
    ).encode()
    huge = client.request("POST", "/v1/orders", big, json_headers)
    cursor = client.request("GET", f"/v1/orders?cursor={2**63}", headers={"Host": "localhost"})
    assert (deep.status, huge.status, cursor.status) == (400, 422, 400)
    for answer in (deep, huge, cursor):
        check(answer, "POST")
    client.close()
