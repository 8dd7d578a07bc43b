"""The multi-region rig: per region Mosquitto, Redis, a bridge and a pipeline on loopback ports.

Regions share nothing (GEO.md): each has its own broker, its own Redis with
the shipped ``redis/redis.conf`` (AOF, ``appendfsync always``), its own
bridge and pipeline. A bridge in region R reaches every *other* region's
Redis through a :class:`fleet.geo.links.Link` (``R>S``), so a partition
between R and S blackholes exactly those connections and nothing else:
devices, local Redis and local brokers are untouched.

::

    with GeoStack(workdir, GeoSettings(regions=2)) as geo:
        eu, us = geo.regions
        geo.partition("eu", "us")
        ...
        geo.heal("eu", "us")
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pipeline.catalog import read_catalog, store_catalog
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from testrig.errors import ServerError
from testrig.powercut import CutReport, PowerCutMount
from testrig.servers import MosquittoProcess, RedisProcess, ServerProcess, free_port
from testrig.services import ServiceProcess, console_script, http_ok

from ..errors import FleetError
from ..stack import DEMO_CATALOG
from .links import LinkHost

REGION_NAMES = ("eu", "us", "ap")
MAX_REGIONS = len(REGION_NAMES)
# Several Python services start at once; on a crowded 2-core machine each may take 10 s+.
SERVICE_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GeoSettings:
    """How many regions, and what every region's services are told."""

    regions: int = 2
    shards: int = 4
    workers: int = 1
    catalog: Path = DEMO_CATALOG
    claim_idle_ms: int = 3_000
    pipelines: bool = True
    # Extra flags for every bridge (cross-region timeouts in tests, say).
    bridge_args: tuple[str, ...] = ()
    # Regions whose Redis keeps its files on a power-cut filesystem (testrig.powercut;
    # needs /dev/fuse), for Region.power_cut.
    redis_powercut: tuple[str, ...] = ()
    # Start the bridges and pipelines with the region flags (False: single-region
    # services, for the backward-compatibility test of a region-aware agent).
    region_flags: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.regions <= MAX_REGIONS:
            raise FleetError(f"--regions must be 1..{MAX_REGIONS}, not {self.regions}")


def link_name(source: str, target: str) -> str:
    """The link a bridge in ``source`` uses to reach ``target``'s Redis."""
    return f"{source}>{target}"


class Region:
    """One region's processes. ``down``/``up`` kill and restore broker, Redis and bridge."""

    def __init__(self, name: str, workdir: Path, settings: GeoSettings) -> None:
        self.name = name
        self.workdir = workdir
        self.settings = settings
        self.broker = MosquittoProcess(workdir / "mosquitto")
        self.redis_disk: PowerCutMount | None = None
        redis_args: tuple[str, ...] = ()
        if name in settings.redis_powercut:
            self.redis_disk = PowerCutMount(workdir / "redis-disk")
            redis_args = ("--dir", str(self.redis_disk.path))  # a later --dir wins
        self.redis = RedisProcess.production(workdir / "redis", extra_args=redis_args)
        self.bridge: ServiceProcess | None = None
        self.pipeline: ServiceProcess | None = None
        self.pipeline_port = free_port()

    @property
    def mqtt_url(self) -> str:
        """Where the region's devices connect."""
        return self.broker.url

    @property
    def redis_url(self) -> str:
        """The region's own Redis (its streams)."""
        return self.redis.url

    @property
    def api_url(self) -> str:
        """The region's orders API."""
        return f"http://127.0.0.1:{self.pipeline_port}"

    def servers(self) -> list[ServerProcess]:
        """Every process of the region, in start order."""
        parts: list[ServerProcess] = [self.redis, self.broker]
        parts += [p for p in (self.bridge, self.pipeline) if p is not None]
        return parts

    def down(self) -> list[int]:
        """SIGKILL Redis, broker and bridge (the region's outage); return the killed pids.

        Redis goes first: from then on nothing, local or remote, can write there.
        """
        killed: list[int] = []
        for part in (self.redis, self.broker, self.bridge):
            if part is not None and (pid := part.pid) is not None:
                part.kill()
                killed.append(pid)
        return killed

    def up(self) -> None:
        """Start Redis, broker and bridge again on their ports (Redis reloads its AOF)."""
        self.redis.start()
        self.broker.start()
        if self.bridge is not None:
            start_service(self.bridge)

    def power_cut(self) -> CutReport:
        """Power cut of the Redis host: unsynced writes dropped, SIGKILL, power on, restart.

        Raises:
            FleetError: the region's Redis is not on a power-cut filesystem.
        """
        if self.redis_disk is None:
            raise FleetError(f"region {self.name}: Redis is not on a power-cut disk")
        report = self.redis_disk.cut()
        self.redis.kill()
        self.redis_disk.power_on()
        self.redis.start()
        return report

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until the bridge's /readyz says 200 (subscribed, Redis durable); False on timeout.

        Until then the broker answers PUBACK 0x10 (no matching subscribers) and
        drops orders: a region whose broker is up is not serving yet.
        """
        if self.bridge is None:
            return True
        deadline = time.monotonic() + timeout_s
        while not http_ok(f"{self.bridge.url}/readyz"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @property
    def is_down(self) -> bool:
        """True while the region's broker or Redis is not running."""
        return not (self.broker.running and self.redis.running)


class GeoStack:
    """Owns every region's processes and the links between them."""

    def __init__(self, workdir: Path, settings: GeoSettings = GeoSettings()) -> None:
        self.workdir = workdir
        self.settings = settings
        self.regions = [
            Region(name, workdir / name, settings) for name in REGION_NAMES[: settings.regions]
        ]
        self.links = LinkHost()
        # Every ordered pair (R, S) gets its own link port: R's bridge → S's Redis.
        self.link_ports = {
            link_name(r.name, s.name): free_port()
            for r, s in itertools.permutations(self.regions, 2)
        }
        run = uuid.uuid4().hex[:6]
        for region in self.regions:
            region.bridge = self._bridge(region, run)
            if settings.pipelines:
                region.pipeline = self._pipeline(region)

    @property
    def names(self) -> list[str]:
        """The region names, in order."""
        return [r.name for r in self.regions]

    def region(self, name: str) -> Region:
        """The region called ``name``.

        Raises:
            FleetError: no such region.
        """
        for region in self.regions:
            if region.name == name:
                return region
        raise FleetError(f"no region {name!r}; regions are {', '.join(self.names)}")

    def region_redis_url(self, source: str, target: str) -> str:
        """The URL ``source``'s bridge uses for ``target``'s Redis (through the link if remote)."""
        if source == target:
            return self.region(target).redis_url
        return f"redis://127.0.0.1:{self.link_ports[link_name(source, target)]}/0"

    def agent_regions(self, home: int | str) -> list[tuple[str, str]]:
        """(name, broker URL) of every region, rotated so ``home`` comes first."""
        index = home if isinstance(home, int) else self.names.index(home)
        index %= len(self.regions)
        rotated = self.regions[index:] + self.regions[:index]
        return [(r.name, r.mqtt_url) for r in rotated]

    def agent_region_flags(self, home: int | str) -> list[str]:
        """``--region NAME=URL`` flags for an ``edge-agent`` homed in ``home``."""
        return [f for name, url in self.agent_regions(home) for f in ("--region", f"{name}={url}")]

    def _bridge(self, region: Region, run: str) -> ServiceProcess:
        s = self.settings
        argv = [
            console_script("order-bridge"),
            "--mqtt-url", region.mqtt_url, "--redis-url", region.redis_url,
            "--shards", str(s.shards), "--client-id", f"geo-{run}-{region.name}-bridge",
            # No trimming: the verifier counts every entry a run appended.
            "--trim-every-batches", "0",
        ]  # fmt: skip
        if s.region_flags:
            argv += ["--region", region.name]
            for target in self.names:
                argv += ["--region-redis", f"{target}={self.region_redis_url(region.name, target)}"]
        argv += s.bridge_args
        return _service("bridge", region.workdir / "bridge", argv)

    def _pipeline(self, region: Region) -> ServiceProcess:
        s = self.settings
        argv = [
            console_script("order-pipeline"),
            "--mqtt-url", region.mqtt_url, "--redis-url", region.redis_url,
            "--shards", str(s.shards), "--workers", str(s.workers),
            "--claim-idle-ms", str(s.claim_idle_ms),
        ]  # fmt: skip
        # The pipeline's region flags, where this pipeline has them.
        if s.region_flags and "region" in PipelineConfig.__struct_fields__:
            argv += ["--region", region.name]
            if "region_api_allow_http" in PipelineConfig.__struct_fields__:
                argv += ["--region-api-allow-http"]  # every region's API is on loopback
            for other in self.regions:
                if other is not region:
                    argv += ["--region-api", f"{other.name}={other.api_url}"]
        return _service("pipeline", region.workdir / "pipeline", argv, port=region.pipeline_port)

    def urls(self) -> dict[str, str]:
        """Every part's URL, per region, for people poking at the rig."""
        out: dict[str, str] = {}
        for region in self.regions:
            out[f"{region.name} mqtt"] = region.mqtt_url
            out[f"{region.name} redis"] = region.redis_url
            if region.bridge is not None:
                out[f"{region.name} bridge"] = region.bridge.url + "/metrics"
            if region.pipeline is not None:
                out[f"{region.name} orders API"] = region.api_url + "/v1/orders/{order_id}"
        return out

    # Partitions between regions: only the bridge → remote-Redis links.

    def pair_links(self, a: str, b: str) -> list[str]:
        """The links that carry traffic between regions ``a`` and ``b`` (both ways)."""
        for name in (a, b):
            self.region(name)  # raises on an unknown name
        if a == b:
            raise FleetError(f"a partition needs two different regions, not {a}|{b}")
        return [link_name(a, b), link_name(b, a)]

    def partition(self, a: str, b: str) -> None:
        """Blackhole every connection between ``a`` and ``b`` (nothing is reset)."""
        for name in self.pair_links(a, b):
            self.links.blackhole(name)

    def heal(self, a: str, b: str, *, reset: bool = False) -> None:
        """End the partition; ``reset`` first aborts the held connections."""
        for name in self.pair_links(a, b):
            if reset:
                self.links.reset(name)
            self.links.heal(name)

    def partitioned(self) -> list[str]:
        """Names of the links blackholed now."""
        return [name for name, link in self.links.links.items() if link.blackholed]

    def start(self) -> None:
        """Start every region's servers and links, load each catalog, then the services.

        Parts of one kind start in parallel (each start waits until its part answers).
        """
        self.links.start()
        for region in self.regions:
            if region.redis_disk is not None:
                region.redis_disk.start()
        _in_parallel([r.redis.start for r in self.regions] + [r.broker.start for r in self.regions])
        for r, s in itertools.permutations(self.regions, 2):
            name = link_name(r.name, s.name)
            self.links.add(name, ("127.0.0.1", s.redis.port), self.link_ports[name])
        catalog = self.settings.catalog
        shards = self.settings.shards
        _in_parallel(
            [functools.partial(load_catalog, r.redis_url, catalog, shards) for r in self.regions]
        )
        services = [s for r in self.regions for s in (r.bridge, r.pipeline) if s is not None]
        _in_parallel([functools.partial(start_service, service) for service in services])
        for region in self.regions:
            if not region.wait_ready():
                raise ServerError(f"region {region.name}: bridge not ready")

    def stop(self) -> None:
        """SIGTERM every service, then the servers, then the links."""
        for region in self.regions:
            for service in (region.bridge, region.pipeline):
                if service is not None:
                    service.stop()
        for region in self.regions:
            region.redis.stop()
            region.broker.stop()
            if region.redis_disk is not None:
                region.redis_disk.stop()
        self.links.stop()

    def pids(self) -> Iterator[int]:
        """Every process the rig runs right now."""
        for region in self.regions:
            for part in region.servers():
                if (pid := part.pid) is not None:
                    yield pid

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_service(service: ServiceProcess) -> None:
    """Start a service; if its HTTP port was taken meanwhile, start it on a new one.

    Only the broker and Redis ports are part of the rig's wiring; a service's
    port just serves /metrics, and free loopback ports get reused by other
    processes' outgoing connections while a service is down.
    """
    try:
        service.start()
    except ServerError:
        if "address already in use" not in service.log_tail(5):
            raise
        service.port = free_port()
        service.start()


def _service(name: str, workdir: Path, argv: list[str], port: int | None = None) -> ServiceProcess:
    service = ServiceProcess(name, workdir, argv, port=port)
    service.start_timeout_s = SERVICE_START_TIMEOUT_S
    return service


def _in_parallel(calls: Sequence[Callable[[], object]], workers: int = 0) -> None:
    """Run the calls on threads; re-raise the first failure once all have finished."""
    with ThreadPoolExecutor(max_workers=workers or max(1, len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
    for future in futures:
        future.result()


def load_catalog(redis_url: str, catalog: Path, shards: int) -> None:
    """What ``order-pipeline catalog load`` does, in-process (a subprocess per region is slow)."""

    async def store() -> None:
        client = aioredis.from_url(redis_url)
        try:
            await store_catalog(client, read_catalog(catalog), shards=shards)
        finally:
            await client.aclose()

    try:
        asyncio.run(store())
    except (RedisError, OSError, PipelineError) as exc:
        raise ServerError(f"catalog load into {redis_url} failed: {exc}") from exc


def parse_region_names(text: str, known: Sequence[str]) -> list[str]:
    """``"eu|us"`` → ``["eu", "us"]``, each a known region.

    Raises:
        FleetError: an unknown name.
    """
    names = [n.strip() for n in text.split("|") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FleetError(f"unknown region {', '.join(unknown)}; regions are {', '.join(known)}")
    return names
