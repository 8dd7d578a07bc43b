"""Helpers for the edge agent tests: configs, sample orders, the bridge double."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent import AgentConfig

from .bridge_double import BridgeDouble


def order_body(order_id: str | None = None, *, qty: int = 2, price: int = 150) -> dict[str, Any]:
    """An intake order body (what an app POSTs)."""
    body: dict[str, Any] = {
        "currency": "EUR",
        "items": [{"sku": "cola-330", "qty": qty, "unit_price": price}],
        "total": qty * price,
    }
    if order_id is not None:
        body["order_id"] = order_id
    return body


@pytest.fixture
def make_config(tmp_path: Path, device_id: str, mqtt_url: str) -> Callable[..., AgentConfig]:
    """Build an AgentConfig for this test's device, fast timeouts, free HTTP port."""

    def make(**overrides: Any) -> AgentConfig:
        settings: dict[str, Any] = {
            "device_id": device_id,
            "mqtt_url": mqtt_url,
            "db": str(tmp_path / "outbox.db"),
            "http_port": 0,
            "receipt_timeout_s": 2.0,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "poll_interval_s": 0.2,
            "drain_rate_per_min": 600_000.0,
            "storage_retry_s": 0.2,
            **overrides,
        }
        return AgentConfig(**settings)

    return make


@pytest.fixture
def bridge(mqtt_url: str) -> Iterator[BridgeDouble]:
    """A bridge double on the shared broker that accepts everything."""
    with BridgeDouble(mqtt_url) as double:
        yield double
