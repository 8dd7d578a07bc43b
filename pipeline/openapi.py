"""The orders API's OpenAPI 3.1.0 document, generated from msgspec types.

The bodies are msgspec Structs below, built on the wire contract's own types
(``OrderId``, ``DeviceId``, ``Currency``, ``Item`` from ``schemas.messages``),
and ``msgspec.json.schema_components`` renders them as JSON Schema 2020-12,
the dialect OpenAPI 3.1 uses. Run ``python -m pipeline.openapi`` after a
change; a test fails while the committed ``pipeline/openapi.json`` differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from schemas.ids import END
from schemas.json_schema import clean_descriptions
from schemas.messages import Currency, DeviceId, Item, OrderId

from .ops import PAGE_FILES, OpsSummary

DOCUMENT_PATH: Final = Path(__file__).parent / "openapi.json"
REF: Final = "#/components/schemas/{name}"

PipelineStatus = Literal[
    "received", "validated", "reserved", "confirmed", "fulfilled", "rejected", "failed"
]
ENTRY_ID_PATTERN: Final = r"^[0-9]{1,20}-[0-9]{1,20}" + END


class Problem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details (servicekit.problems).

    ``type`` is ``urn:iot-orders:problem:{code}``. Codes: invalid-parameter,
    invalid-cursor, order-not-found, ambiguous-order-id, dlq-entry-not-found,
    already-replayed, not-replayable, redis-unavailable, region-unavailable and
    region-bad-answer (geo mode), unauthorized, forbidden, and for errors outside
    the handlers not-found, method-not-allowed, payload-too-large, http-error,
    internal-error.
    """

    type: str
    title: str
    status: int
    code: str
    detail: str | msgspec.UnsetType = msgspec.UNSET
    parameter: str | msgspec.UnsetType = msgspec.UNSET
    replayed_as: str | msgspec.UnsetType = msgspec.UNSET
    required_role: Literal["read", "operate"] | msgspec.UnsetType = msgspec.UNSET
    device_ids: list[DeviceId] | msgspec.UnsetType = msgspec.UNSET
    unreachable_regions: list[str] | msgspec.UnsetType = msgspec.UNSET


class Transition(msgspec.Struct):
    """One status change in an order's history."""

    status: PipelineStatus
    step: str
    reason: str
    at: int


class OrderRecord(msgspec.Struct):
    """An order as the pipeline keeps it, with its history."""

    order_id: OrderId
    device_id: DeviceId
    seq: int
    status: PipelineStatus
    reason: str | None
    total: int
    currency: Currency
    items: list[Item]
    received_at: int
    updated_at: int
    stream: str
    entry_id: str
    steps_done: list[str]
    last_error: str | None
    history: list[Transition]


class OrderSummary(msgspec.Struct):
    """One row of a device's order list."""

    order_id: OrderId
    device_id: DeviceId
    seq: int
    status: PipelineStatus
    reason: str | None
    updated_at: int


class OrderPage(msgspec.Struct):
    """A page of a device's orders.

    ``next_cursor`` is the cursor after the last item (the one given when the
    page is empty); null only when neither exists. Coming back with it later
    yields exactly what arrived since.
    """

    items: list[OrderSummary]
    next_cursor: str | None
    has_more: bool


class DeadLetter(msgspec.Struct, kw_only=True):
    """A DLQ entry: the contract's fields plus what a replay needs; ``payload`` is hex."""

    id: str
    reason: str
    replayable: bool
    topic: str | msgspec.UnsetType = msgspec.UNSET
    payload: str | msgspec.UnsetType = msgspec.UNSET
    received_at: str | msgspec.UnsetType = msgspec.UNSET
    source: str | msgspec.UnsetType = msgspec.UNSET
    stream: str | msgspec.UnsetType = msgspec.UNSET
    entry_id: str | msgspec.UnsetType = msgspec.UNSET
    order_id: str | msgspec.UnsetType = msgspec.UNSET
    device_id: str | msgspec.UnsetType = msgspec.UNSET
    seq: str | msgspec.UnsetType = msgspec.UNSET
    deliveries: str | msgspec.UnsetType = msgspec.UNSET
    error: str | msgspec.UnsetType = msgspec.UNSET


class DeadLetterPage(msgspec.Struct):
    """A page of the DLQ (same cursor rules as :class:`OrderPage`)."""

    items: list[DeadLetter]
    next_cursor: str | None
    has_more: bool


class Replay(msgspec.Struct):
    """A replayed DLQ entry and the shard stream entry it became."""

    entry_id: str
    replayed_as: str


class Resolved(msgspec.Struct):
    """A dead letter an operator settled by hand; it left the DLQ."""

    entry_id: str
    resolved: bool


class Health(msgspec.Struct):
    """Redis answers."""

    status: Literal["ok"]


_BODIES: Final = (
    Problem, OrderRecord, OrderPage, DeadLetterPage, Replay, Resolved, Health, OpsSummary,
    OrderId, DeviceId,
)  # fmt: skip


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(name=ref)}}}


def _answer(description: str, body: str = "Problem") -> dict[str, Any]:
    content_type = "application/json" if body != "Problem" else "application/problem+json"
    return {
        "description": description,
        "content": {content_type: {"schema": {"$ref": REF.format(name=body)}}},
    }


_GEO_NOTE: Final = (
    " Geo mode (`--region`, `--region-api`): an order this region does not have is looked up "
    "in the other regions' APIs and their answer is proxied, with the `Orders-Region` header "
    "naming the region that answered; only JSON is relayed (502 `region-bad-answer` "
    "otherwise); 503 `region-unavailable` when a region could not be asked and none had it."
)
_ORDERS_REGION: Final = {
    "Orders-Region": {
        "description": "geo mode: the region whose API answered (only on a proxied answer)",
        "schema": {"type": "string"},
    }
}


def _found(description: str, body: str) -> dict[str, Any]:
    """A 200 that may come from another region (geo mode)."""
    return {**_answer(description, body), "headers": _ORDERS_REGION}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    role: str | None,
    parameters: list[dict[str, Any]] | None = None,
    description: str = "",
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if role is None:
        op["security"] = []
    else:
        responses = {
            **responses,
            "401": _answer("no valid bearer token (only when tokens are configured)"),
        }
        if role == "operate":
            responses["403"] = _answer("the token's role is read; this needs operate")
        op["x-required-role"] = role
    op["responses"] = dict(sorted(responses.items()))
    return op


def build() -> dict[str, Any]:
    """The document as a dict."""
    (*_, order_id, device_id), components = msgspec.json.schema_components(
        _BODIES, ref_template=REF
    )
    components = clean_descriptions(components)
    order_id, device_id = clean_descriptions(order_id), clean_descriptions(device_id)
    entry_id = {"type": "string", "pattern": ENTRY_ID_PATTERN}
    cursor = {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "next_cursor of the previous page",
        "schema": {"type": "string"},
    }
    limit = {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
    }
    queue = {
        "name": "queue",
        "in": "query",
        "required": False,
        "description": (
            "pipeline: accepted orders the pipeline gave up on (pipeline:dlq, never trimmed); "
            "intake: what the bridge refused (orders:dlq, capped)"
        ),
        "schema": {"type": "string", "enum": ["pipeline", "intake"], "default": "pipeline"},
    }
    bad_id = "bad order_id"
    paths: dict[str, Any] = {
        "/v1/orders/{order_id}": {
            "get": _operation(
                "getOrder",
                "An order's record and its history, found by order_id alone",
                {
                    "200": _found("the order", "OrderRecord"),
                    "400": _answer(bad_id),
                    "404": _answer("unknown order"),
                    "409": _answer("several devices have an order with this id"),
                    "502": _answer("geo mode: another region answered with something not JSON"),
                    "503": _answer("geo mode: not here, and another region did not answer"),
                },
                role="read",
                parameters=[_path_param("order_id", order_id)],
                description=(
                    "Order ids are unique per device only. When exactly one device has an "
                    "order with this id, it is returned; when several do, the answer is 409 "
                    "`ambiguous-order-id` listing their `device_ids` (ask "
                    "/v1/devices/{device_id}/orders/{order_id} then)." + _GEO_NOTE
                ),
            )
        },
        "/v1/devices/{device_id}/orders": {
            "get": _operation(
                "listDeviceOrders",
                "A device's orders by seq, oldest first; cursor pagination stable under inserts",
                {
                    "200": _answer("a page", "OrderPage"),
                    "400": _answer("bad device_id, cursor or limit"),
                },
                role="read",
                parameters=[_path_param("device_id", device_id), cursor, limit],
            )
        },
        "/v1/devices/{device_id}/orders/{order_id}": {
            "get": _operation(
                "getDeviceOrder",
                "One device's order: its record and its history",
                {
                    "200": _found("the order", "OrderRecord"),
                    "400": _answer("bad device_id or order_id"),
                    "404": _answer("no such order on this device"),
                    "502": _answer("geo mode: another region answered with something not JSON"),
                    "503": _answer("geo mode: not here, and another region did not answer"),
                },
                role="read",
                parameters=[
                    _path_param("device_id", device_id),
                    _path_param("order_id", order_id),
                ],
                description=_GEO_NOTE.strip(),
            )
        },
        "/v1/dlq": {
            "get": _operation(
                "listDeadLetters",
                "Dead letters, oldest first: the pipeline's (replayable) or the intake's",
                {
                    "200": _answer("a page", "DeadLetterPage"),
                    "400": _answer("bad cursor, limit or queue"),
                },
                role="read",
                parameters=[queue, cursor, limit],
            )
        },
        "/v1/dlq/{entry_id}/replay": {
            "post": _operation(
                "replayDeadLetter",
                "Re-drive a dead-lettered order into its shard stream, once",
                {
                    "202": _answer("queued again", "Replay"),
                    "400": _answer("bad entry_id"),
                    "404": _answer("no such DLQ entry"),
                    "409": _answer("already replayed (replayed_as names the new entry)"),
                    "422": _answer("the entry holds no accepted order (a bridge-side dead letter)"),
                },
                role="operate",
                parameters=[_path_param("entry_id", entry_id)],
            )
        },
        "/v1/dlq/{entry_id}/resolve": {
            "post": _operation(
                "resolveDeadLetter",
                "An operator settled a pipeline dead letter by hand: it leaves the DLQ",
                {
                    "200": _answer("resolved", "Resolved"),
                    "400": _answer("bad entry_id"),
                    "404": _answer("no such DLQ entry"),
                },
                role="operate",
                parameters=[_path_param("entry_id", entry_id)],
            )
        },
        "/v1/ops/summary": {
            "get": _operation(
                "getOpsSummary",
                "What the ops page shows: shards, fleet health, DLQ sizes, bridge replicas",
                {
                    "200": _answer("read from Redis now", "OpsSummary"),
                    "503": _answer("Redis unavailable"),
                },
                role="read",
                description=(
                    "Per shard stream: length and entries added (XINFO STREAM), the pipeline "
                    "group's lag, pending and entries read (XINFO GROUPS). Throughput is the "
                    "change of `totals.entries_added` / `totals.entries_read` between two calls. "
                    "Fleet counts come from the health consumer's `health:*` keys, bridges from "
                    "their `ops:bridge:{client_id}` heartbeats."
                ),
            )
        },
        **{
            path: {
                "get": _operation(
                    "opsPage" + ("" if path == "/ops" else name.split(".")[1].title()),
                    f"The ops page's {name}: static, no data (its script calls the API "
                    "with the operator's bearer token)",
                    {
                        "200": {
                            "description": name,
                            "content": {content_type: {"schema": {"type": "string"}}},
                        }
                    },
                    role=None,
                )
            }
            for path, (name, content_type) in PAGE_FILES.items()
        },
        "/healthz": {
            "get": _operation(
                "healthz",
                "200 while Redis answers",
                {"200": _answer("healthy", "Health"), "503": _answer("Redis unavailable")},
                role=None,
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus text format",
                {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "503": _answer("Redis unavailable"),
                },
                role="read",
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "iot-orders pipeline: orders API",
            "version": "1.2.0",
            "description": (
                "Order records and history, per-device paging, the dead-letter queue and its "
                "replay, the ops page. Errors are RFC 9457 problem+json with a stable `type` "
                "(urn:iot-orders:problem:{code}). With tokens configured, every operation but "
                "/healthz and the ops page's static files needs a bearer token: role `read` "
                "to read, `operate` to replay "
                "(see x-required-role). Generated by `python -m pipeline.openapi`."
            ),
        },
        "security": [{"bearerToken": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`order-pipeline token new --role read|operate`",
                }
            },
        },
    }


def render() -> str:
    """The document as committed."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write ``pipeline/openapi.json``."""
    DOCUMENT_PATH.write_text(render())


if __name__ == "__main__":
    main()
