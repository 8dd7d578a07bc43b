"""Geo mode for the orders API: find an order another region owns (GEO.md).

Each region's pipeline processes only its own streams, so an order's record
lives in its authority region. When this region's API has no record for
``GET /v1/orders/{order_id}`` or ``GET /v1/devices/{device_id}/orders/{order_id}``,
:func:`lookup_elsewhere` asks every other region's API (``--region-api
NAME=URL``) for the same path at once and **proxies** the answer: the first
region that has the order (200, or 409 for an ambiguous bare order id) answers
the client, with ``Orders-Region: NAME``. Only JSON is relayed (the record, or
a problem document): any other content type, or a body that is not JSON, is a
``502 region-bad-answer`` problem, so another region can never put HTML or a
script on this API's origin. The peer's URL stays private: no
``Content-Location``.

Why proxy and not redirect: the lookup must ask the other regions anyway (a
307 to a guessed region could send the client to the wrong one), so the body
is already in hand; and HTTP clients drop ``Authorization`` on a redirect to
another origin (requests, aiohttp, browsers' fetch), so a 307 would turn into
a 401 where tokens are in use. The caller's ``Authorization`` header is
forwarded to the other regions over ``https://``, which check it as usual. A
plain ``http://`` peer is refused at start unless ``--region-api-allow-http``
says the link is private, and even then never gets the token (a peer that
wants one answers 401, which counts as no answer).

A lookup carries ``Orders-Region-Lookup: <this region>``; an API that receives
one answers from its own data only, so regions never ask each other in circles.

Answers: every region says 404 → this region's 404. A region that did not
answer in ``region_api_timeout_s`` (or failed, or answered anything but 200,
404 or 409) while none had the order → 503 ``region-unavailable`` with
``unreachable_regions``: the order may be there, so a 404 would be a lie.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import aiohttp
import msgspec
import structlog
from aiohttp import web

from schemas.ids import is_region_name
from servicekit.problems import problem

log = structlog.get_logger(__name__)

LOOKUP_HEADER: Final = "Orders-Region-Lookup"
REGION_HEADER: Final = "Orders-Region"
# Answers of another region that mean "it is here": the record, or an ambiguous bare id.
_FOUND: Final = frozenset({200, 409})
_NOT_HERE: Final = 404
# What may be relayed: the order record, or the problem document of a 409.
_JSON_TYPES: Final = frozenset({"application/json", "application/problem+json"})


def parse_region_apis(
    own: str, entries: tuple[str, ...], *, allow_http: bool = False
) -> dict[str, str]:
    """``NAME=URL`` entries as a dict of the *other* regions' base URLs.

    Args:
        own: this region's name.
        entries: the ``--region-api`` entries.
        allow_http: accept ``http://`` peers (``--region-api-allow-http``).

    Raises:
        ValueError: a malformed entry, a name twice, entries without ``own``, or an
            ``http://`` peer without ``allow_http``.
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
        if url.startswith("http://") and not allow_http and name != own:
            raise ValueError(
                f"region_api {name}=http://… is plain HTTP: lookups and their answers would "
                "cross the network in clear; use https://, or set region_api_allow_http on a "
                "private link (the bearer token is never sent over http)"
            )
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
        self._plain_http = {name for name, url in apis.items() if url.startswith("http://")}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        if self._plain_http:
            log.warning(
                "region_api_plain_http", regions=sorted(self._plain_http),
                hint="lookups to these regions cross the network in clear and carry no bearer "
                "token; a region that requires one answers 401, counted as unreachable",
            )  # fmt: skip
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
        found = [answer for answer in answers if answer.status in _FOUND]
        for answer in found:
            if answer.status is not None and _is_json(answer):
                return web.Response(
                    status=answer.status,
                    body=answer.body,
                    content_type=answer.content_type,
                    headers={REGION_HEADER: answer.region},
                )
        if found:
            bad = sorted(answer.region for answer in found)
            log.warning(
                "region_lookup_not_json", regions=bad,
                content_types=sorted({answer.content_type for answer in found}),
            )  # fmt: skip
            return problem(
                502, "region-bad-answer",
                f"{', '.join(bad)} answered, but not with JSON; nothing was relayed",
                title="Bad answer from another region", regions=bad,
            )  # fmt: skip
        unreachable = sorted(a.region for a in answers if a.status != _NOT_HERE)
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
        if (auth := request.headers.get("Authorization")) and region not in self._plain_http:
            headers["Authorization"] = auth
        url = f"{self.apis[region]}{request.path_qs}"
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as reply:
                body = await reply.read()
                return _Answer(region, reply.status, body, reply.content_type.lower())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("region_lookup_failed", region=region, url=url, error=repr(exc))
            return _Answer(region, None, error=repr(exc))


def _is_json(answer: _Answer) -> bool:
    """A JSON content type, and a body that is JSON indeed."""
    if answer.content_type not in _JSON_TYPES:
        return False
    try:
        msgspec.json.decode(answer.body)
    except msgspec.DecodeError:
        return False
    return True


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
