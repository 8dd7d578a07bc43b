"""The orders API (aiohttp): orders, device paging, the DLQ and its replay, health, metrics.

Served by ``order-pipeline`` on ``--http-port`` beside the workers (or alone
with ``--workers 0``). The OpenAPI document is ``pipeline/openapi.json``,
served at ``/openapi.json``.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis.exceptions import RedisError

from ._lua import Scripts
from .dlq import QUEUES, decode_cursor, encode_cursor, list_dead_letters, replay, resolve
from .errors import ReplayError
from .metrics import ApiMetrics
from .names import device_index_key, order_key
from .problems import problem, problem_middleware
from .records import find_devices, load_order, text

ORDER_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
DEVICE_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MEMBER_RE: Final = re.compile(r"^\d{20}:[A-Za-z0-9_-]{8,64}$")  # records.index_member
ENTRY_ID_RE: Final = re.compile(r"^\d{1,20}-\d{1,20}$")
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
_SUMMARY_FIELDS: Final = ("order_id", "device_id", "seq", "status", "reason", "updated_at")

REDIS: Final = web.AppKey("redis", aioredis.Redis)
SCRIPTS: Final = web.AppKey("scripts", Scripts)
METRICS: Final = web.AppKey("metrics", ApiMetrics)
SHARDS: Final = web.AppKey("shards", int)
WORKER_REGISTRY: Final = web.AppKey[CollectorRegistry | None]("worker_registry")
MULTIPROC_DIR: Final = web.AppKey[str | None]("multiproc_dir")


def openapi_document() -> dict[str, Any]:
    """The published OpenAPI 3.1 document."""
    doc: dict[str, Any] = json.loads(
        resources.files("pipeline").joinpath("openapi.json").read_text()
    )
    return doc


def create_app(
    client: aioredis.Redis,
    *,
    shards: int,
    worker_registry: CollectorRegistry | None = None,
    multiproc_dir: str | None = None,
) -> web.Application:
    """Build the application; the caller owns ``client`` and runs the app."""
    app = web.Application(middlewares=[problem_middleware])
    app[REDIS] = client
    app[SCRIPTS] = Scripts()
    app[METRICS] = ApiMetrics(shards)
    app[SHARDS] = shards
    app[WORKER_REGISTRY] = worker_registry
    app[MULTIPROC_DIR] = multiproc_dir
    app.router.add_get("/v1/orders/{order_id}", get_order)
    app.router.add_get("/v1/devices/{device_id}/orders", list_device_orders)
    app.router.add_get("/v1/devices/{device_id}/orders/{order_id}", get_device_order)
    app.router.add_get("/v1/dlq", list_dlq)
    app.router.add_post("/v1/dlq/{entry_id}/replay", replay_dlq)
    app.router.add_post("/v1/dlq/{entry_id}/resolve", resolve_dlq)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app


def _limit(request: web.Request) -> int | web.Response:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        detail = f"limit must be an integer in 1..{MAX_LIMIT}"
        return problem(400, "invalid-parameter", "Invalid parameter", detail, parameter="limit")
    return int(raw)


def _is_entry_id(value: str) -> bool:
    """A Redis stream id: two unsigned 64-bit integers joined by ``-``."""
    return bool(ENTRY_ID_RE.match(value)) and all(int(p) < 2**64 for p in value.split("-"))


def _bad_cursor() -> web.Response:
    return problem(400, "invalid-cursor", "Invalid cursor", "use a next_cursor this API returned")


def _bad_order_id() -> web.Response:
    return problem(
        400, "invalid-parameter", "Invalid parameter", "bad order_id", parameter="order_id"
    )


def _bad_device_id() -> web.Response:
    return problem(
        400, "invalid-parameter", "Invalid parameter", "bad device_id", parameter="device_id"
    )


async def get_order(request: web.Request) -> web.Response:
    """``GET /v1/orders/{order_id}``: the record and its history, found by order_id alone.

    Order ids are unique per device only: when several devices have one, the
    answer is ``409 ambiguous-order-id`` with their ids, and the client asks
    ``/v1/devices/{device_id}/orders/{order_id}``.
    """
    order_id = request.match_info["order_id"]
    if not ORDER_ID_RE.match(order_id):
        return _bad_order_id()
    devices = await find_devices(request.app[REDIS], order_id)
    if len(devices) > 1:
        return problem(409, "ambiguous-order-id", "Ambiguous order id",
                       f"{len(devices)} devices have an order {order_id}",
                       device_ids=devices)  # fmt: skip
    record = await load_order(request.app[REDIS], devices[0], order_id) if devices else None
    if record is None:
        return problem(404, "order-not-found", "Order not found", f"no order {order_id}")
    return web.json_response(record)


async def get_device_order(request: web.Request) -> web.Response:
    """``GET /v1/devices/{device_id}/orders/{order_id}``: one device's order and its history."""
    device_id, order_id = request.match_info["device_id"], request.match_info["order_id"]
    if not DEVICE_ID_RE.match(device_id):
        return _bad_device_id()
    if not ORDER_ID_RE.match(order_id):
        return _bad_order_id()
    record = await load_order(request.app[REDIS], device_id, order_id)
    if record is None:
        return problem(
            404, "order-not-found", "Order not found", f"no order {order_id} on {device_id}"
        )
    return web.json_response(record)


async def list_device_orders(request: web.Request) -> web.Response:
    """``GET /v1/devices/{device_id}/orders``: the device's orders by ``seq``, oldest first.

    The cursor is the position of the last order returned, so orders that
    arrive while a client pages show up after it, and none twice.
    """
    device_id = request.match_info["device_id"]
    if not DEVICE_ID_RE.match(device_id):
        return _bad_device_id()
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    start = "-"
    if cursor := request.query.get("cursor"):
        try:
            position = decode_cursor(cursor)
        except ValueError:
            return _bad_cursor()
        if not MEMBER_RE.match(position):
            return _bad_cursor()
        start = "(" + position
    client = request.app[REDIS]
    members: Any = await client.zrange(
        device_index_key(device_id), start, "+", bylex=True, offset=0, num=limit + 1
    )
    page = [text(m) for m in members[:limit]]
    async with client.pipeline(transaction=False) as pipe:
        for member in page:
            pipe.hmget(order_key(device_id, member.partition(":")[2]), list(_SUMMARY_FIELDS))
        rows = await pipe.execute()
    items = []
    for row in rows:
        if all(value is None for value in row):
            continue  # its retention ended; the worker trims the index soon
        summary: dict[str, Any] = dict(
            zip(_SUMMARY_FIELDS, (text(v) if v is not None else None for v in row), strict=True)
        )
        summary["seq"] = int(summary["seq"] or 0)
        summary["reason"] = summary["reason"] or None
        summary["updated_at"] = int(summary["updated_at"] or 0)
        items.append(summary)
    # The cursor after the last item, even on the last page: a client can come
    # back with it later and get exactly the orders that arrived since.
    next_cursor = encode_cursor(page[-1]) if page else cursor
    return web.json_response(
        {"items": items, "next_cursor": next_cursor, "has_more": len(members) > limit}
    )


async def list_dlq(request: web.Request) -> web.Response:
    """``GET /v1/dlq?queue=pipeline|intake``: dead letters, oldest first (same cursors).

    ``pipeline`` (default): accepted orders the pipeline gave up on, replayable;
    ``intake``: what the bridge refused (device garbage), read-only and capped.
    """
    limit = _limit(request)
    if isinstance(limit, web.Response):
        return limit
    queue = request.query.get("queue", "pipeline")
    if queue not in QUEUES:
        return problem(400, "invalid-parameter", "Invalid parameter",
                       "queue is pipeline or intake", parameter="queue")  # fmt: skip
    cursor = request.query.get("cursor")
    try:
        if cursor is not None and not _is_entry_id(decode_cursor(cursor)):
            return _bad_cursor()
        items, has_more = await list_dead_letters(
            request.app[REDIS], cursor, limit, "intake" if queue == "intake" else "pipeline"
        )
    except ValueError:
        return _bad_cursor()
    next_cursor = encode_cursor(items[-1]["id"]) if items else cursor
    return web.json_response({"items": items, "next_cursor": next_cursor, "has_more": has_more})


async def replay_dlq(request: web.Request) -> web.Response:
    """``POST /v1/dlq/{entry_id}/replay``: re-drive a dead-lettered order, once."""
    entry_id = request.match_info["entry_id"]
    if not _is_entry_id(entry_id):
        return problem(
            400, "invalid-parameter", "Invalid parameter", "bad entry_id", parameter="entry_id"
        )
    try:
        new_id = await replay(
            request.app[REDIS], request.app[SCRIPTS], entry_id, request.app[SHARDS]
        )
    except ReplayError as exc:
        if exc.reason == "not_found":
            return problem(404, "dlq-entry-not-found", "DLQ entry not found", exc.detail)
        if exc.reason == "already_replayed":
            return problem(409, "already-replayed", "Already replayed", exc.detail,
                           replayed_as=exc.replayed_as)  # fmt: skip
        return problem(422, "not-replayable", "Not replayable", exc.detail)
    return web.json_response({"entry_id": entry_id, "replayed_as": new_id}, status=202)


async def resolve_dlq(request: web.Request) -> web.Response:
    """``POST /v1/dlq/{entry_id}/resolve``: an operator settled it by hand; it leaves the DLQ."""
    entry_id = request.match_info["entry_id"]
    if not _is_entry_id(entry_id):
        return problem(
            400, "invalid-parameter", "Invalid parameter", "bad entry_id", parameter="entry_id"
        )
    try:
        await resolve(request.app[REDIS], entry_id)
    except ReplayError as exc:
        return problem(404, "dlq-entry-not-found", "DLQ entry not found", exc.detail)
    structlog.get_logger(__name__).warning("dlq_entry_resolved", entry_id=entry_id)
    return web.json_response({"entry_id": entry_id, "resolved": True})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 while Redis answers."""
    try:
        await request.app[REDIS].ping()
    except (RedisError, OSError) as exc:
        return problem(503, "redis-unavailable", "Redis unavailable", repr(exc))
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    app_metrics = request.app[METRICS]
    try:
        await app_metrics.refresh(request.app[REDIS])
    except (RedisError, OSError) as exc:
        return problem(503, "redis-unavailable", "Redis unavailable", repr(exc))
    body = app_metrics.exposition(request.app[WORKER_REGISTRY], request.app[MULTIPROC_DIR])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(_request: web.Request) -> web.Response:
    """``GET /openapi.json``: this API's OpenAPI document."""
    return web.json_response(openapi_document())
