"""Real Mosquitto and Redis for the whole test session, and factories for private ones.

Shared servers (``mosquitto``, ``redis``) live for the session; tests keep out
of each other's way with unique device ids and a per-test ``FLUSHALL``
(``redis_url``). A test that stops, kills or restarts a server takes a private
one from ``mosquitto_factory``/``redis_factory``, cleaned up after the test.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from testrig.servers import MosquittoProcess, RedisProcess, ServerProcess
from tests.tools import HAS_FUSE, require


@pytest.fixture(scope="session")
def fuse() -> None:
    """/dev/fuse and root for the power-cut filesystem; session-wide, so it comes first."""
    require(HAS_FUSE, "needs /dev/fuse and root for the power-cut filesystem (testrig/powercut)")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A Mosquitto broker shared by the session; don't kill it, take a factory one."""
    with MosquittoProcess(tmp_path_factory.mktemp("mosquitto")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server shared by the session."""
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def mqtt_url(mosquitto: MosquittoProcess) -> str:
    """URL of the shared broker."""
    return mosquitto.url


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """URL of the shared Redis, emptied for this test."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


def _factory(cls: type[ServerProcess], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    started: list[ServerProcess] = []
    counter = itertools.count()

    def make(**kwargs: Any) -> ServerProcess:
        server = cls(tmp_path / f"{cls.name}-{next(counter)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoProcess]]:
    """Start private brokers this test may stop, kill or restart."""
    yield from _factory(MosquittoProcess, tmp_path)


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Start private Redis servers this test may stop, kill or restart."""
    yield from _factory(RedisProcess, tmp_path)


@pytest.fixture
def device_id() -> str:
    """A device id no other test uses, so topics and keys never collide."""
    return f"dev-{uuid.uuid4().hex[:12]}"
