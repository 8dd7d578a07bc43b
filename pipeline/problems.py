"""RFC 9457 problem details: one error type per stable ``type`` code."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

PROBLEM_TYPE_PREFIX: Final = "urn:iot-orders:problem:"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str = "", **extra: Any) -> web.Response:
    """A ``application/problem+json`` response with ``type`` = ``urn:iot-orders:problem:{code}``."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": title,
        "status": status,
        "code": code,
    }
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_CONTENT_TYPE)


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn aiohttp's own 404/405 (and other HTTP errors) into problem+json too."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status, "http-error")
        response = problem(exc.status, code, exc.reason, detail=f"{request.method} {request.path}")
        if "Allow" in exc.headers:  # RFC 9110 requires it on a 405
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    return response
