"""RFC 9457 problem details, the one error body of every HTTP API we serve.

Every body has the same members::

    type    urn:iot-orders:problem:{code}
    title   short human summary (defaults to the code in words)
    status  the HTTP status
    detail  what exactly was wrong with this request
    code    the stable machine-readable code (the suffix of ``type``)

plus any extension members a caller adds (``field``, ``parameter``, …).
:func:`problem_middleware` makes aiohttp's own errors (404, 405, 413, …) and
any unexpected exception answer in the same shape, so no error leaves as
``text/plain``. Needs aiohttp, which every service extra installs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import structlog
from aiohttp import web

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_PREFIX",
    "problem",
    "problem_body",
    "problem_middleware",
]

PROBLEM_TYPE_PREFIX: Final = "urn:iot-orders:problem:"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
# aiohttp's own HTTP errors, by status, as codes.
_HTTP_CODES: Final = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
}

log = structlog.get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem_body(
    status: int, code: str, detail: str = "", *, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The problem document as a dict (for answers built elsewhere, and for tests)."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": title or code.replace("-", " ").replace("_", " ").capitalize(),
        "status": status,
        "code": code,
    }
    if detail:
        body["detail"] = detail
    body.update(extra)
    return body


def problem(
    status: int,
    code: str,
    detail: str = "",
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """An ``application/problem+json`` response.

    Args:
        status: the HTTP status.
        code: the stable code; ``type`` is ``urn:iot-orders:problem:{code}``.
        detail: what was wrong with this request.
        title: a short summary; by default the code in words.
        headers: extra response headers (``Allow``, ``WWW-Authenticate``).
        **extra: extension members (``field``, ``parameter``, …).
    """
    body = problem_body(status, code, detail, title=title, **extra)
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's HTTP errors and any unexpected exception with a problem body.

    A 405 keeps its ``Allow`` header (RFC 9110 requires it). An exception no
    handler expected is logged with its traceback and becomes a 500 problem
    without internals in the body.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http-error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        detail = exc.text if exc.status == 413 and exc.text else f"{request.method} {request.path}"
        return problem(exc.status, code, detail, title=exc.reason, headers=headers)
    except Exception:  # isolation boundary: one request fails, the server stays up
        log.exception("http_unhandled_error", method=request.method, path=request.path)
        return problem(
            500, "internal-error", "the server failed; see its log", title="Internal error"
        )
