"""Localhost HTTP intake, ``/healthz`` and ``/metrics`` (aiohttp).

Errors are RFC 9457 ``application/problem+json`` bodies (servicekit.problems)
whose ``code`` (repeated as ``reason``, which v1 apps read) is our reason
code and, for bad input, with the ``field`` at fault. Every error is one,
aiohttp's own 404, 405 and 413 included.

Guards against a web page in a browser on the device (see :func:`guard_middleware`):
the ``Host`` must be a loopback name or one configured in ``http_allowed_hosts``
(DNS rebinding gets 421), orders must be ``application/json`` (a cross-origin
form or ``text/plain`` post gets 415, and such a post is all a browser sends
without a CORS preflight, which we never grant), and with ``http_token`` set
``/v1/*`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import web

from schemas.ids import is_order_id
from servicekit import tracing
from servicekit.problems import Handler, ProblemAppRunner, problem_middleware
from servicekit.problems import problem as _problem

from ._records import OrderRecord
from .errors import AgentClosed, AgentError, InvalidOrder, OutboxFull, StorageError

if TYPE_CHECKING:
    from .agent import EdgeAgent

_AGENT: Final[web.AppKey[EdgeAgent]] = web.AppKey("agent")
MAX_BODY_BYTES: Final = 64 * 1024
MAX_PAGE: Final = 500
MAX_CURSOR: Final = 2**63 - 1  # seq is an SQLite INTEGER
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "[::1]"})
# host[:port]; host is a name, an IPv4 address or a bracketed IPv6 address.
_HOST_RE: Final = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?")
_STATE_RE: Final = re.compile(r"[a-z_]{1,32}")
_BEARER_RE: Final = re.compile(r"Bearer +(\S{1,256})", re.IGNORECASE)
_ALLOWED_HOSTS: Final[web.AppKey[frozenset[str]]] = web.AppKey("allowed_hosts")


def problem(status: int, reason: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem response whose code is an agent reason code."""
    return _problem(status, reason, detail, reason=reason, **extra)


def allowed_hosts(configured: str) -> frozenset[str]:
    """The Host names the intake answers: loopback plus ``http_allowed_hosts`` (comma-separated)."""
    extra = {name.strip().lower() for name in configured.split(",") if name.strip()}
    return LOOPBACK_HOSTS | extra


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a ``Host`` header names this agent (any port)."""
    if header is None:
        return False
    match = _HOST_RE.fullmatch(header)
    return match is not None and match.group("host").lower() in allowed


def _parse_uint(raw: str, maximum: int) -> int | None:
    """A decimal in 0..maximum written in ASCII digits only, else None."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(maximum)):
        return None
    value = int(raw)
    return value if value <= maximum else None


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host check (DNS rebinding), the optional local token, JSON-only orders."""
    if not host_allowed(request.headers.get("Host"), request.app[_ALLOWED_HOSTS]):
        return problem(
            421,
            "misdirected_request",
            "Host must be localhost, 127.0.0.1, [::1] or a name in http_allowed_hosts",
        )
    token = request.app[_AGENT].config.http_token
    if token and request.path.startswith("/v1/"):
        match = _BEARER_RE.fullmatch(request.headers.get("Authorization", ""))
        presented = match.group(1) if match else ""
        if not hmac.compare_digest(presented.encode(), token.encode()):
            return problem(
                401,
                "unauthorized",
                "send Authorization: Bearer <http_token>",
                headers={"WWW-Authenticate": 'Bearer realm="edge-agent"'},
            )
    if request.method == "POST" and request.content_type != "application/json":
        return problem(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {request.content_type!r}",
            field="Content-Type",
        )
    return await handler(request)


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
    out: dict[str, Any] = msgspec.to_builtins(rec)
    if not rec.regions:
        del out["regions"]  # single-region mode: the v1 answer, unchanged
    return out


async def post_order(request: web.Request) -> web.Response:
    """``POST /v1/orders``: 202 once committed."""
    agent = request.app[_AGENT]
    try:
        data = msgspec.json.decode(await request.read())
    except msgspec.DecodeError as exc:
        return problem(400, "malformed", f"body is not JSON: {exc}", field="$")
    except RecursionError:
        return problem(400, "malformed", "body is nested too deeply", field="$")
    with tracing.intake_span(request.headers.get(tracing.TRACEPARENT_HEADER)) as span:
        try:
            result = await agent.submit(data, traceparent=span.traceparent)
        except AgentError as exc:
            span.fail(exc.reason)
            return _error_response(exc)
        span.set("order.id", result.order_id)
        span.set("duplicate", result.duplicate)  # a repeat keeps the first one's traceparent
    # The first answer, also for a repeated order_id.
    return _json({"order_id": result.order_id, "status": "queued"}, status=202)


async def get_order(request: web.Request) -> web.Response:
    """``GET /v1/orders/{order_id}``."""
    agent = request.app[_AGENT]
    order_id = request.match_info["order_id"]
    if not is_order_id(order_id):
        return problem(
            400, "invalid_query", "order_id breaks the contract's rule", field="order_id"
        )
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
    limit = _parse_uint(query.get("limit", "50"), MAX_PAGE)
    if limit is None or limit < 1:
        return problem(400, "invalid_query", f"limit must be an integer in 1..{MAX_PAGE}",
                       field="limit")  # fmt: skip
    cursor = _parse_uint(query["cursor"], MAX_CURSOR) if query.get("cursor") else None
    if query.get("cursor") and cursor is None:
        return problem(400, "invalid_query", "cursor must be a next_cursor this API returned",
                       field="cursor")  # fmt: skip
    state = query.get("state") or None
    if state is not None and not _STATE_RE.fullmatch(state):
        return problem(400, "invalid_query", "unknown state", field="state")
    try:
        rows, next_cursor = await agent.list_orders(state, cursor, limit)
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
    health = await agent.health()
    agent.metrics.oldest_pending_age.set(health.oldest_unreceipted_age_s or 0.0)
    agent.metrics.awaiting_authority.set(health.awaiting_authority)
    agent.metrics.awaiting_unknown_region.set(health.awaiting_unknown_region)
    body = agent.metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def build_app(agent: EdgeAgent) -> web.Application:
    """The intake application for one agent."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[problem_middleware, guard_middleware]
    )
    app[_AGENT] = agent
    app[_ALLOWED_HOSTS] = allowed_hosts(agent.config.http_allowed_hosts)
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
    runner = ProblemAppRunner(build_app(agent), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, agent.config.http_host, agent.config.http_port)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port
