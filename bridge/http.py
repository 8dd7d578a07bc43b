"""``/healthz``, ``/readyz`` and ``/metrics`` on the bridge's ``--http-port``."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from servicekit.problems import ProblemAppRunner, problem_middleware

from .metrics import BridgeMetrics

Checks = Callable[[], dict[str, bool]]
Details = Callable[[], dict[str, Any]]


class HttpServer:
    """The operations endpoints, as an async context manager.

    Args:
        health: named checks; ``/healthz`` is 503 when one of them fails.
        ready: named checks for ``/readyz`` (health plus "subscribed", "not stopping").
        details: more fields for the ``/readyz`` body (facts, not checks).
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: BridgeMetrics,
        *,
        health: Checks,
        ready: Checks,
        details: Details | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._health = health
        self._ready = ready
        self._details = details
        app = web.Application(middlewares=[problem_middleware])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        # Unknown paths and requests aiohttp cannot parse get problem documents too.
        self._runner = ProblemAppRunner(app, access_log=None)

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return _answer(self._health())

    async def _readyz(self, request: web.Request) -> web.Response:
        return _answer(self._ready(), self._details() if self._details else {})

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _answer(checks: dict[str, bool], details: dict[str, Any] | None = None) -> web.Response:
    ok = all(checks.values())
    body = {**(details or {}), "ok": ok, "checks": checks}
    return web.json_response(body, status=200 if ok else 503)
