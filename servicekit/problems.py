"""RFC 9457 problem details, the one error body of every HTTP API we serve.

Every body has the same members::

    type    urn:iot-orders:problem:{code}
    title   short human summary (defaults to the code in words)
    status  the HTTP status
    detail  what exactly was wrong with this request
    code    the stable machine-readable code (the suffix of ``type``)

plus any extension members a caller adds (``field``, ``parameter``, …).
:func:`problem_middleware` makes aiohttp's own errors (404, 405, 413, …) and
any unexpected exception answer in the same shape. A request aiohttp cannot
even parse (a header over 8190 bytes, malformed HTTP) never reaches a
middleware: aiohttp answers it from its protocol handler with a ``text/plain``
400 that quotes the offending bytes (a bearer token, say) and logs them at
error level. :class:`ProblemAppRunner` serves an app with a protocol handler
that answers those with a problem too, quoting nothing, and logs one warning
without the request's bytes. So no error leaves as ``text/plain``. Needs
aiohttp, which every service extra installs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_PREFIX",
    "ProblemAppRunner",
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


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's protocol handler, but its own error answers are problems (see module doc)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer an unparsable request (or a handler timeout) with a problem; log no bytes.

        aiohttp's ``message`` and the exception's text quote the request (a
        header's first 100 bytes), so neither is logged nor answered.
        """
        error = type(exc).__name__ if exc is not None else None
        if status >= 500:
            log.error("http_protocol_error", status=status, error=error, remote=request.remote)
        else:
            log.warning("http_bad_request", status=status, error=error, remote=request.remote)
        if request.writer.output_size > 0:  # a response is half sent: nothing can follow it
            raise ConnectionError("response already started; cannot send the error")
        if isinstance(exc, LineTooLong):
            code, detail = "bad-request", "a request line or header is longer than 8190 bytes"
        elif status < 500:
            code, detail = "bad-request", "the request is not valid HTTP/1.1"
        else:
            code, detail = "internal-error", "the server failed; see its log"
        response = problem(status, code, detail)
        response.force_close()
        return response


class _ProblemServer(web.Server):
    """The low-level server, making :class:`_ProblemRequestHandler` per connection."""

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """``web.AppRunner`` whose protocol-level errors are problem documents too.

    aiohttp offers no public hook for the handler class, so the server the app
    builds is given :class:`_ProblemServer`'s behaviour; the tests that send
    oversized headers to the real services hold this to aiohttp's releases.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer
        return server
