"""The hostile-input suite: generated requests and payloads at every entry point.

``make test`` runs a short form (``CASES`` per target). ``HOSTILE_SLOW=1``
runs the full form: at least 10,000 generated cases per target, with the
memory check meaningful at that size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final

import pytest

from fleet.servers import RedisProcess, free_port
from pipeline.api_tokens import digest_line, new_token

from .live import ServiceProcess

SLOW: Final = bool(os.environ.get("HOSTILE_SLOW"))
CASES: Final = 10_000 if SLOW else 150
# RSS may grow while caches and allocator arenas warm up; after the first tenth
# of the run it must stay within this much (a leak of 1 KB per case over
# 10,000 cases would cross it).
RSS_SLACK_BYTES: Final = 24 * 1024 * 1024
SHARDS: Final = 4
READ_TOKEN: Final = new_token()
OPERATE_TOKEN: Final = new_token()


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A real ``edge-agent`` whose broker is unreachable (so only HTTP works)."""
    workdir = tmp_path_factory.mktemp("hostile-agent")
    port = free_port()
    dead_broker = next(p for p in iter(free_port, None) if p != port)  # nothing listens there
    argv = ["-m", "edge_agent.cli", "--device-id", "hostile-dev",
            "--mqtt-url", f"mqtt://127.0.0.1:{dead_broker}", "--db", str(workdir / "outbox.db"),
            "--http-port", str(port), "--reconnect-min-s", "1", "--reconnect-max-s", "5",
            "--max-rows", str(10 * CASES + 100), "--max-bytes", str(1 << 30),
            "--http-allowed-hosts", "kiosk.local", "--log-level", "warning"]  # fmt: skip
    server = ServiceProcess(argv, port, workdir / "agent.log", {})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_server(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A real ``order-pipeline --workers 0`` (the orders API alone) with read and operate tokens."""
    workdir = tmp_path_factory.mktemp("hostile-api")
    port = free_port()
    tokens = digest_line(READ_TOKEN, "read") + ";" + digest_line(OPERATE_TOKEN, "operate")
    argv = ["-m", "pipeline.cli", "run", "--workers", "0", "--redis-url", redis_server.url,
            "--http-port", str(port), "--shards", str(SHARDS),
            "--log-level", "warning"]  # fmt: skip
    server = ServiceProcess(argv, port, workdir / "api.log", {"ORDERS_API_TOKENS": tokens})
    yield server
    server.stop()
