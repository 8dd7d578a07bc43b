"""Localhost HTTP intake, ``/healthz`` and ``/metrics`` (aiohttp).

Errors are RFC 9457 ``application/problem+json`` bodies with our ``reason``
code and, for bad input, the ``field`` at fault.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web

from ._records import OrderRecord
from .errors import AgentClosed, AgentError, InvalidOrder, OutboxFull, StorageError

if TYPE_CHECKING:
    from .agent import EdgeAgent

_AGENT: Final[web.AppKey[EdgeAgent]] = web.AppKey("agent")
MAX_BODY_BYTES: Final = 64 * 1024
MAX_PAGE: Final = 500
_PROBLEM_TYPES: Final = "https://github.com/iot-orders/problems/"


def problem(status: int, reason: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem response."""
    body = {
        "type": _PROBLEM_TYPES + reason,
        "title": reason.replace("_", " "),
        "status": status,
        "detail": detail,
        "reason": reason,
        **extra,
    }
    return web.Response(
        status=status, body=json.dumps(body), content_type="application/problem+json"
    )


def _error_response(exc: AgentError) -> web.Response:
    match exc:
        case InvalidOrder():
            status = 400 if exc.reason == "malformed" else 422
            return problem(status, exc.reason, exc.detail, field=exc.field)
        case OutboxFull():
            return problem(507, exc.reason, exc.detail)
        case StorageError() if exc.reason == "disk_full":
            return problem(507, exc.reason, exc.detail)
        case StorageError() | AgentClosed():
            return problem(503, exc.reason, exc.detail)
    return problem(500, exc.reason, exc.detail)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type="application/json"
    )


def _record(rec: OrderRecord) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.structs.asdict(rec)
    return out


async def post_order(request: web.Request) -> web.Response:
    """``POST /v1/orders``: 202 once committed."""
    agent = request.app[_AGENT]
    try:
        data = msgspec.json.decode(await request.read())
    except msgspec.DecodeError as exc:
        return problem(400, "malformed", f"body is not JSON: {exc}", field="$")
    try:
        result = await agent.submit(data)
    except AgentError as exc:
        return _error_response(exc)
    # The first answer, also for a repeated order_id.
    return _json({"order_id": result.order_id, "status": "queued"}, status=202)


async def get_order(request: web.Request) -> web.Response:
    """``GET /v1/orders/{order_id}``."""
    agent = request.app[_AGENT]
    order_id = request.match_info["order_id"]
    try:
        rec = await agent.get(order_id)
    except AgentError as exc:
        return _error_response(exc)
    if rec is None:
        return problem(404, "not_found", f"no order {order_id!r}", field="order_id")
    return _json(_record(rec))


async def list_orders(request: web.Request) -> web.Response:
    """``GET /v1/orders?state=&cursor=&limit=``: newest first."""
    agent = request.app[_AGENT]
    query = request.query
    try:
        limit = int(query.get("limit", "50"))
        cursor = int(query["cursor"]) if query.get("cursor") else None
    except ValueError:
        return problem(400, "invalid_query", "limit and cursor must be integers", field="limit")
    if not 1 <= limit <= MAX_PAGE:
        return problem(400, "invalid_query", f"limit must be 1..{MAX_PAGE}", field="limit")
    try:
        rows, next_cursor = await agent.list_orders(query.get("state") or None, cursor, limit)
    except AgentError as exc:
        return _error_response(exc)
    return _json(
        {
            "orders": [_record(r) for r in rows],
            "next_cursor": None if next_cursor is None else str(next_cursor),
        }
    )


async def retry_order(request: web.Request) -> web.Response:
    """``POST /v1/orders/{order_id}/retry``: re-queue one held order."""
    agent = request.app[_AGENT]
    order_id = request.match_info["order_id"]
    try:
        result = await agent.retry_held([order_id])
    except AgentError as exc:
        return _error_response(exc)
    if result.past_horizon:
        return problem(
            409,
            "past_dedup_horizon",
            f"order {order_id!r} was first sent longer ago than resend_max_age_s; "
            "sending it again could duplicate it",
            field="order_id",
        )
    if result.not_held:
        rec = await agent.get(order_id)
        if rec is None:
            return problem(404, "not_found", f"no order {order_id!r}", field="order_id")
        return problem(409, "not_held", f"order {order_id!r} is {rec.state}", field="order_id")
    return _json(result)


async def retry_held(request: web.Request) -> web.Response:
    """``POST /v1/orders/retry-held``: re-queue every held order."""
    try:
        result = await request.app[_AGENT].retry_held(None)
    except AgentError as exc:
        return _error_response(exc)
    return _json(result)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 when the outbox can write, 503 otherwise."""
    health = await request.app[_AGENT].health()
    return web.Response(
        status=200 if health.ok else 503,
        body=msgspec.json.encode(health),
        content_type="application/json",
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    agent = request.app[_AGENT]
    # The oldest age needs an outbox query, so it is read here rather than by a gauge callback.
    age = (await agent.health()).oldest_unreceipted_age_s
    agent.metrics.oldest_pending_age.set(age or 0.0)
    body = agent.metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def build_app(agent: EdgeAgent) -> web.Application:
    """The intake application for one agent."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_AGENT] = agent
    app.router.add_post("/v1/orders", post_order)
    app.router.add_get("/v1/orders", list_orders)
    app.router.add_get("/v1/orders/{order_id}", get_order)
    app.router.add_post("/v1/orders/retry-held", retry_held)
    app.router.add_post("/v1/orders/{order_id}/retry", retry_order)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_http(agent: EdgeAgent) -> tuple[web.AppRunner, int]:
    """Serve ``agent`` on its configured host and port; return the runner and real port."""
    runner = web.AppRunner(build_app(agent), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, agent.config.http_host, agent.config.http_port)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port
