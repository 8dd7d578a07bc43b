"""The shared logging set-up: JSON lines with the bound device and order ids."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from servicekit.logs import configure_logging, truncate


def test_log_lines_are_json_with_bound_context(capsys: pytest.CaptureFixture[str]) -> None:
    """structlog and stdlib records both come out as one JSON object per line."""
    configure_logging("info", service="test-svc")
    try:
        with structlog.contextvars.bound_contextvars(device_id="k1", order_id="01ORDER00"):
            structlog.get_logger("t").info("order_queued", depth=3)
        logging.getLogger("paho").warning("from a library")
        structlog.get_logger("t").debug("hidden at info level")
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    assert lines[0]["msg"] == "order_queued"
    assert (lines[0]["device_id"], lines[0]["order_id"], lines[0]["depth"]) == (
        "k1",
        "01ORDER00",
        3,
    )
    assert lines[0]["service"] == "test-svc"
    assert lines[1]["msg"] == "from a library"
    assert lines[1]["level"] == "warning"


def test_truncate_caps_logged_payloads() -> None:
    """Payloads in logs are cut to 512 bytes of hex with the remainder counted."""
    assert truncate(b"\x01\x02") == "0102"
    assert truncate(bytes(600)).endswith("…(+88B)")
