"""Geo mode for the orders API: find an order another region owns (GEO.md).

Each region's pipeline processes only its own streams, so an order's record
lives in its authority region. When this region's API has no record for
``GET /v1/orders/{order_id}`` or ``GET /v1/devices/{device_id}/orders/{order_id}``,
:func:`lookup_elsewhere` asks every other region's API (``--region-api
NAME=URL``) for the same path at once and **proxies** the answer: the first
region that has the order (200, or 409 for an ambiguous bare order id) answers
the client, with ``Orders-Region: NAME`` and ``Content-Location`` naming the
region's URL for it.

Why proxy and not redirect: the lookup must ask the other regions anyway (a
307 to a guessed region could send the client to the wrong one), so the body
is already in hand; and HTTP clients drop ``Authorization`` on a redirect to
another origin (requests, aiohttp, browsers' fetch), so a 307 would turn into
a 401 where tokens are in use. The caller's ``Authorization`` header is
forwarded to the other regions, which check it as usual.

A lookup carries ``Orders-Region-Lookup: <this region>``; an API that receives
one answers from its own data only, so regions never ask each other in circles.

Answers: every region says 404 → this region's 404. A region that did not
answer in ``region_api_timeout_s`` (or failed) while none had the order → 503
``region-unavailable`` with ``unreachable_regions``: the order may be there,
so a 404 would be a lie.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import aiohttp
import structlog
from aiohttp import web

from schemas.ids import is_region_name
from servicekit.problems import problem

log = structlog.get_logger(__name__)

LOOKUP_HEADER: Final = "Orders-Region-Lookup"
REGION_HEADER: Final = "Orders-Region"
# Answers of another region that mean "it is here": the record, or an ambiguous bare id.
_FOUND: Final = frozenset({200, 409})


def parse_region_apis(own: str, entries: tuple[str, ...]) -> dict[str, str]:
    """``NAME=URL`` entries as a dict of the *other* regions' base URLs.

    Raises:
        ValueError: a malformed entry, a name twice, or entries without ``own``.
    """
    if not own:
        if entries:
            raise ValueError("region_api needs region (the name of this region)")
        return {}
    if not is_region_name(own):
        raise ValueError(f"region {own!r} is not 1-32 chars of [a-z0-9-]")
    urls: dict[str, str] = {}
    for entry in entries:
        name, sep, url = entry.partition("=")
        if not sep or not is_region_name(name) or not url.startswith(("http://", "https://")):
            raise ValueError(f"region_api {entry!r} is not NAME=http(s)://…")
        if name in urls:
            raise ValueError(f"region_api names {name!r} twice")
        urls[name] = url.rstrip("/")
    urls.pop(own, None)  # our own entry may be listed; we never ask ourselves
    return urls


@dataclass(frozen=True, slots=True)
class _Answer:
    region: str
    status: int | None  # None: no answer
    body: bytes = b""
    content_type: str = "application/json"
    error: str | None = None


class RegionLookup:
    """Asks the other regions' orders APIs; an async context manager owning its HTTP session."""

    def __init__(self, own: str, apis: Mapping[str, str], *, timeout_s: float) -> None:
        self.own = own
        self.apis = dict(apis)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def find(self, request: web.Request) -> web.Response | None:
        """The other regions' answer for ``request``'s path, or None to answer 404 locally."""
        if not self.apis or LOOKUP_HEADER in request.headers:
            return None
        answers = await asyncio.gather(*(self._ask(name, request) for name in self.apis))
        for answer in answers:
            if answer.status in _FOUND:
                url = f"{self.apis[answer.region]}{request.path_qs}"
                return web.Response(
                    status=answer.status,
                    body=answer.body,
                    content_type=answer.content_type.split(";")[0],
                    headers={REGION_HEADER: answer.region, "Content-Location": url},
                )
        unreachable = sorted(a.region for a in answers if a.status is None or a.status >= 500)
        if unreachable:
            return problem(
                503, "region-unavailable",
                f"not in this region; no answer from {', '.join(unreachable)}",
                title="Region unavailable", unreachable_regions=unreachable,
            )  # fmt: skip
        return None

    async def _ask(self, region: str, request: web.Request) -> _Answer:
        assert self._session is not None, "use RegionLookup as an async context manager"
        headers = {LOOKUP_HEADER: self.own}
        if auth := request.headers.get("Authorization"):
            headers["Authorization"] = auth
        url = f"{self.apis[region]}{request.path_qs}"
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as reply:
                body = await reply.read()
                return _Answer(region, reply.status, body, reply.content_type)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("region_lookup_failed", region=region, url=url, error=repr(exc))
            return _Answer(region, None, error=repr(exc))


REGION_LOOKUP: Final = web.AppKey("region_lookup", RegionLookup)


async def lookup_elsewhere(request: web.Request) -> web.Response | None:
    """The hook :mod:`pipeline.api` calls before answering 404 for an order.

    Returns the other regions' answer, a 503 when one of them could not be
    asked, or None (no geo mode, a lookup from another region, or nowhere).
    """
    lookup = request.app.get(REGION_LOOKUP)
    if lookup is None:
        return None
    return await lookup.find(request)
