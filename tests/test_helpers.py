"""The shared test helpers: orders that encode the same each time, and waits that fail loudly."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from schemas import decode_order, encode
from tests.helpers import make_order, raw_http, wait_until, wait_until_blocking


def test_the_same_arguments_make_the_same_bytes() -> None:
    """An order made twice encodes the same (a resend is a duplicate) and decodes valid."""
    order = make_order("kiosk-1", 7, [("COLA-33", 2, 150), ("WATER-50", 1, 100)])
    assert encode(order) == encode(
        make_order("kiosk-1", 7, [("COLA-33", 2, 150), ("WATER-50", 1, 100)])
    )
    assert decode_order(encode(order), topic_device_id="kiosk-1") == order
    assert (order.order_id, order.total) == ("o-kiosk-1-000007", 400)
    assert make_order("kiosk-1", 7, order_id="other-order").order_id == "other-order"


async def test_wait_until_takes_plain_and_async_checks() -> None:
    """A plain and an async check that already hold return at once."""

    async def holds() -> bool:
        return True

    assert await wait_until(lambda: True) < 1.0
    assert await wait_until(holds) < 1.0


async def test_wait_until_fails_the_test_with_the_explanation() -> None:
    """A check that never holds fails the test, naming what it waited for and why."""
    with pytest.raises(pytest.fail.Exception, match="the impossible\nbecause"):
        await wait_until(lambda: False, 0.1, "the impossible", explain=lambda: "because")


def test_wait_until_blocking_fails_after_its_timeout() -> None:
    """The blocking wait fails the same way."""
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 0\.1 s waiting for never"):
        wait_until_blocking(lambda: False, 0.1, "never")


async def test_raw_http_reads_status_type_and_json_body() -> None:
    """`raw_http` sends the bytes as given and parses a real server's JSON answer."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response({"ok": 1}, status=201)

    app = web.Application()
    app.router.add_get("/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        request = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        status, content_type, body = await asyncio.to_thread(raw_http, port, request)
    finally:
        await runner.cleanup()
    assert (status, content_type.split(";")[0], body) == (201, "application/json", {"ok": 1})
