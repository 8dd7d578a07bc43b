"""Helpers every test package shares: a valid order, waiting for a condition, raw HTTP."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

import pytest

from schemas import Item, Order

# created_at is 2023-11-14 plus seq ms: the same arguments always encode to the
# same bytes, so publishing an order twice is a duplicate, never a conflict.
CREATED_AT_MS = 1_700_000_000_000
POLL_S = 0.05


def make_order(
    device_id: str,
    seq: int = 0,
    items: Sequence[tuple[str, int, int]] = (("COLA-33", 1, 150),),
    *,
    order_id: str | None = None,
    currency: str = "EUR",
    attrs: Mapping[str, str] | None = None,
) -> Order:
    """A valid v1 order of ``(sku, qty, unit_price)`` lines; its id is ``o-{device}-{seq:06d}``."""
    lines = tuple(Item(sku, qty, price) for sku, qty, price in items)
    return Order(
        v=1,
        order_id=order_id or f"o-{device_id}-{seq:06d}",
        device_id=device_id,
        seq=seq,
        created_at=CREATED_AT_MS + seq,
        currency=currency,
        items=lines,
        total=sum(i.qty * i.unit_price for i in lines),
        attrs=dict(attrs or {}),
    )


def _timed_out(what: str, timeout_s: float, explain: Callable[[], Any] | None) -> NoReturn:
    detail = "" if explain is None else f"\n{explain()}"
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}{detail}")


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 30.0,
    what: str = "condition",
    *,
    explain: Callable[[], Any] | None = None,
) -> float:
    """Poll ``check`` (plain or async) until true; return the seconds it took.

    Fails the test after ``timeout_s``, with ``explain()`` in the message if given.
    """
    started = time.monotonic()
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            _timed_out(what, timeout_s, explain)
        await asyncio.sleep(POLL_S)


def wait_until_blocking(
    check: Callable[[], bool],
    timeout_s: float = 30.0,
    what: str = "condition",
    *,
    explain: Callable[[], Any] | None = None,
) -> float:
    """:func:`wait_until` for tests without an event loop: sleeps between polls."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            _timed_out(what, timeout_s, explain)
        time.sleep(POLL_S)
    return time.monotonic() - started


def raw_http(port: int, request: bytes, timeout_s: float = 10.0) -> tuple[int, str, Any]:
    """Send ``request`` byte for byte to 127.0.0.1:``port`` (what no HTTP client would send,
    e.g. a header over aiohttp's limit); return the status, content type and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }
    return int(status_line.split()[1]), headers.get("content-type", ""), json.loads(body)
