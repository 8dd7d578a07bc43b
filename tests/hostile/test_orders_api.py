"""Hostile requests against the orders API: schemathesis from its OpenAPI document, then raw fuzz.

Both run with tokens configured, as production does; the raw fuzz also sends
no token or a wrong one. No 5xx, every error a problem document, memory flat.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.api import openapi_document
from pipeline.api_tokens import new_token

from .conftest import CASES, OPERATE_TOKEN, READ_TOKEN, SLOW, rss_slack_bytes
from .live import Answer, HttpClient, MemoryWatch, ServiceProcess
from .strategies import NASTY_INTS, header_text, quoted

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)] if SLOW else []
schema = schemathesis.openapi.from_dict(openapi_document())
# Seven operations; a few have no inputs and run once, so the others carry the count.
PER_OPERATION = CASES // 4 + 1
_schemathesis_watch = MemoryWatch(PER_OPERATION * 5)


def check(answer: Answer, method: str) -> None:
    """No 5xx, and every error a problem document."""
    assert answer.status < 500, answer.body[:300]
    if answer.status >= 400 and method != "HEAD":
        assert answer.content_type == "application/problem+json", answer.body[:300]
        problem = json.loads(answer.body)
        assert problem["status"] == answer.status
        assert problem["type"] == f"urn:iot-orders:problem:{problem['code']}"


@schema.parametrize()
@settings(
    max_examples=PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_5xx(
    case: schemathesis.Case[Any], api_server: ServiceProcess
) -> None:
    """Generated from the OpenAPI document: no 5xx, documented answers only, 401 without a token."""
    _schemathesis_watch.rss = api_server.rss
    _schemathesis_watch.tick()
    case.call_and_validate(
        base_url=f"http://127.0.0.1:{api_server.port}",
        headers={"Authorization": f"Bearer {OPERATE_TOKEN}"},
        # Cursors are opaque (a well-formed one we never issued is a documented 400), and
        # unknown query parameters are ignored by design (cache busters, tracing), which
        # schemathesis would count as "negative data accepted".
        excluded_checks=[
            schemathesis.checks.positive_data_acceptance,
            schemathesis.checks.negative_data_rejection,
        ],
    )


segment = st.one_of(
    st.text(max_size=70),
    st.sampled_from(
        ["1-1", "0-0", f"{2**64 - 1}-{2**64 - 1}", f"{2**64}-0", "1-1\n", "order-00000001"]
    ),
    NASTY_INTS.map(str),
)
cursors = st.one_of(
    st.text(max_size=40).map(quoted),
    st.builds(
        lambda s: quoted(base64.urlsafe_b64encode(s.encode()).decode().rstrip("=")),
        st.one_of(
            st.text(max_size=40),
            st.sampled_from([f"{2**64 - 1}-{2**64 - 1}", "1-1\n", "0" * 20 + ":order-00000001\n"]),
        ),
    ),
)
requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(
            ["GET", "GET", "GET", "POST", "POST", "DELETE", "PUT", "OPTIONS"]
        ),
        "path": st.one_of(
            st.builds(lambda a: f"/v1/orders/{quoted(a)}", segment),
            st.builds(lambda a: f"/v1/devices/{quoted(a)}/orders", segment),
            st.builds(lambda a, b: f"/v1/devices/{quoted(a)}/orders/{quoted(b)}", segment, segment),
            st.builds(lambda a: f"/v1/dlq/{quoted(a)}/replay", segment),
            st.sampled_from(["/v1/dlq", "/healthz", "/metrics", "/openapi.json", "/", "/v1/dlq/"]),
        ),
        "query": st.dictionaries(
            st.sampled_from(["limit", "cursor", "x"]),
            st.one_of(st.text(max_size=30), NASTY_INTS.map(str)),
            max_size=2,
        ),
        "cursor": st.none() | cursors,
        "auth": st.sampled_from(["read", "operate", "none", "wrong"]) | header_text,
    }
)


@given(request=requests)
@settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def _fuzz(request: dict[str, object], client: HttpClient, watch: MemoryWatch) -> None:
    watch.tick()
    method = str(request["method"])
    query = urllib.parse.urlencode(request["query"])  # type: ignore[arg-type]
    if request["cursor"] is not None:
        query = (query + "&" if query else "") + f"cursor={request['cursor']}"
    path = str(request["path"]) + (f"?{query}" if query else "")
    tokens = {"read": READ_TOKEN, "operate": OPERATE_TOKEN, "wrong": new_token()}
    auth = str(request["auth"])
    headers = {}
    if auth != "none":
        headers["Authorization"] = f"Bearer {tokens[auth]}" if auth in tokens else auth
    check(client.request(method, path, None, headers), method)


def test_raw_requests_find_no_5xx_and_memory_stays_flat(api_server: ServiceProcess) -> None:
    """CASES raw requests (10,000 with HOSTILE_SLOW=1) with any ids, cursors and tokens."""
    client = HttpClient(api_server.port)
    watch = MemoryWatch(CASES, api_server.rss)
    try:
        _fuzz(client=client, watch=watch)
    finally:
        client.close()
    assert watch.count >= CASES
    assert watch.growth() < rss_slack_bytes(watch.count)


def test_schemathesis_ran_its_cases_and_memory_stayed_flat() -> None:
    """Runs after the schemathesis cases (file order): enough of them ran, and RSS held.

    Run alone (without test_schemathesis_finds_no_5xx) it fails: no cases ran.
    """
    count = _schemathesis_watch.count
    assert count >= CASES, f"only {count} schemathesis cases ran, not {CASES}"
    assert _schemathesis_watch.growth() < rss_slack_bytes(count)
