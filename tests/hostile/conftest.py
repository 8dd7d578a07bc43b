"""The hostile-input suite: generated requests and payloads at every entry point.

``make test`` runs a short form (``CASES`` per target). ``HOSTILE_SLOW=1``
runs the full form: at least 10,000 generated cases per target, with the
memory check meaningful at that size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from pipeline.api_tokens import digest_line, new_token
from testrig.servers import RedisProcess, free_port

from .live import ServiceProcess

SLOW: Final = bool(os.environ.get("HOSTILE_SLOW"))
CASES: Final = 10_000 if SLOW else 150
# RSS may grow while caches and allocator arenas warm up; after the first tenth
# of the run it must stay within a floor for that noise plus a little per case
# (rss_slack_bytes). Measured growth: under 0.6 MiB at 150 cases, under 1.3 MiB
# at 2,000, the agent's and the bridge's under 0.9 MiB at 10,000. A leak of
# 1 KiB per case crosses the slack at 10,000 cases, one of 16 KiB at 150.
RSS_FLOOR_BYTES: Final = 2 * 1024 * 1024
RSS_PER_CASE_BYTES: Final = 512
SHARDS: Final = 4
READ_TOKEN: Final = new_token()
OPERATE_TOKEN: Final = new_token()


def rss_slack_bytes(cases: int) -> int:
    """How much a server's RSS may grow over ``cases`` cases after the warm-up tenth."""
    return RSS_FLOOR_BYTES + RSS_PER_CASE_BYTES * cases


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
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A real ``order-pipeline --workers 0`` (the orders API alone) with read and operate tokens.

    It has a Redis of its own: the module outlives the tests around it, which empty the
    shared Redis and write other shard layouts into its deployment manifest.
    """
    workdir = tmp_path_factory.mktemp("hostile-api")
    with RedisProcess(workdir / "redis") as redis_server:
        yield from _api_server(redis_server, workdir)


def _api_server(redis_server: RedisProcess, workdir: Path) -> Iterator[ServiceProcess]:
    port = free_port()
    tokens = digest_line(READ_TOKEN, "read") + ";" + digest_line(OPERATE_TOKEN, "operate")
    argv = ["-m", "pipeline.cli", "run", "--workers", "0", "--redis-url", redis_server.url,
            "--http-port", str(port), "--shards", str(SHARDS),
            "--log-level", "warning"]  # fmt: skip
    server = ServiceProcess(argv, port, workdir / "api.log", {"ORDERS_API_TOKENS": tokens})
    yield server
    server.stop()
