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
from _pytest.nodeid import NodeId
from hypothesis import HealthCheck, settings
from schemathesis.pytest.plugin import SchemathesisFunction

from testrig.servers import MosquittoProcess, RedisProcess, ServerProcess
from tests.tools import HAS_FUSE, require

# The session fixtures of this file are cheap: each xdist worker starts its own.
PER_WORKER_MODULE = __name__

# Hypothesis's timing checks (a 200 ms deadline per example, a health check on slow data
# generation) fail a correct property when a busy 2-core machine stalls the process for a
# moment ("Unreliable test timings"). The properties themselves are what the tests assert.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test an id of its own, and under ``--dist loadgroup`` its xdist group.

    Runs after xdist's own hook, which writes the group into ``item._nodeid``: pytest 9
    reads the id from ``item._id`` instead, so without this every group mark is lost.
    """
    for item in items:
        if isinstance(item, SchemathesisFunction) and item.id.params is None:
            # schemathesis names each operation's case test[GET /x] but pytest 9 builds the
            # id from its original name: every case of a test shared one id.
            label = item.name.partition("[")[2].removesuffix("]")
            item._id = item.id.with_params(label)
    # An xdist worker has --dist reset to "no" and the choice kept in option.loadgroup.
    if not getattr(config.option, "loadgroup", False):
        return
    bound = {_module_key(item) for item in items if module_fixtures(item)}
    for item in items:
        groups = {str(mark.args[0]) for mark in item.iter_markers("xdist_group")}
        if _module_key(item) in bound:
            groups.add(_module_key(item))
        groups.update(_session_fixtures(item))
        if groups and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


def _fixture_scopes(item: pytest.Item) -> Iterator[tuple[str, str]]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return
    for name, defs in info.name2fixturedefs.items():
        module = defs[-1].func.__module__
        if module.startswith("tests.") and module != PER_WORKER_MODULE:
            yield name, defs[-1].scope


def module_fixtures(item: pytest.Item) -> list[str]:
    """Module- or class-scoped fixtures: the whole file runs on one worker, in file order."""
    return [name for name, scope in _fixture_scopes(item) if scope in {"module", "class"}]


def _session_fixtures(item: pytest.Item) -> list[str]:
    """Expensive session fixtures (a cluster, a two-region rig): their tests share a worker."""
    return [name for name, scope in _fixture_scopes(item) if scope in {"session", "package"}]


def _module_key(item: pytest.Item) -> str:
    return item.nodeid.partition("::")[0]


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
