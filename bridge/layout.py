"""The bridge's side of the deployment manifest (servicekit.layout), in every region it writes."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import structlog
from redis.exceptions import RedisClusterException, RedisError

from servicekit import layout
from servicekit.backoff import Backoff

from .config import BridgeConfig

log = structlog.get_logger(__name__)


class LayoutCheck:
    """The manifest checks of one bridge: this region's Redis, then every other region's.

    This region's Redis is checked before anything starts (retried while it is
    unreachable: no order can be written without it anyway). Another region's
    is checked at start if it answers in time, else by its watch once it does,
    so a region that is down never keeps this bridge from starting.
    """

    def __init__(self, config: BridgeConfig, *, shards_given: bool) -> None:
        self.config = config
        self._shards_given = shards_given
        urls = {config.region or "": config.local_redis_url}
        urls.update({n: url for n, url in config.region_urls().items() if n != config.region})
        # Sentinel serves this region's Redis only; other regions' are plain URLs.
        self.clients = {
            name: layout.connect(
                url,
                cluster=config.redis_cluster,
                timeout_s=config.redis_timeout_s,
                sentinels=config.redis_sentinel if name == (config.region or "") else (),
                sentinel_master=config.redis_sentinel_master,
            )
            for name, url in urls.items()
        }
        self.agreed: dict[str, layout.Manifest] = {}

    @staticmethod
    def where(name: str) -> str:
        return f"region {name}" if name else "--redis-url"

    async def _agree(self, name: str) -> layout.Manifest:
        local = self.agreed.get(self.config.region or "")
        manifest = await layout.agree(
            self.clients[name],
            service="order-bridge",
            where=self.where(name),
            shards=self.config.shards if local is None else local.shards,
            # Other regions' orders land in their streams with our count: it must be theirs.
            shards_given=self._shards_given or local is not None,
            regions=self.config.region_urls(),
        )
        self.agreed[name] = manifest
        return manifest

    async def start(self) -> BridgeConfig:
        """Agree with this region's manifest (and the others' that answer); the settings to run."""
        local = self.config.region or ""
        backoff = Backoff(0.1, self.config.backoff_max_s)
        failures = 0
        while True:
            try:
                manifest = await self._agree(local)
                break
            except (RedisError, RedisClusterException, OSError) as exc:
                if failures % 100 == 0:
                    log.error(  # noqa: TRY400 - the error is the whole story
                        "bridge NOT READY: waiting for Redis to check the deployment "
                              "manifest", error=repr(exc), failures=failures)  # fmt: skip
                failures += 1
                await asyncio.sleep(backoff.next_delay())
        self.config = msgspec.structs.replace(self.config, shards=manifest.shards)
        for name in self.clients:
            if name == local:
                continue
            try:
                async with asyncio.timeout(self.config.region_timeout_s):
                    await self._agree(name)
            except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
                log.warning("region unreachable: its manifest is checked once it answers",
                            region=name, error=repr(exc))  # fmt: skip
        return self.config

    async def watch(self) -> None:
        """Until cancelled: each Redis's manifest still describes this bridge's layout."""
        async with asyncio.TaskGroup() as watches:
            for name in self.clients:
                watches.create_task(self._watch_one(name), name=f"layout-watch-{name}")

    async def _watch_one(self, name: str) -> None:
        local = name == (self.config.region or "")
        while name not in self.agreed:
            await asyncio.sleep(layout.WATCH_INTERVAL_S)
            if not local:  # this region's is agreed before the intake connects (start)
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await self._agree(name)
        client, manifest = self.clients[name], self.agreed[name]
        await layout.watch(client, manifest, service="order-bridge", where=self.where(name))

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
