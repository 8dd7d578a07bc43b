"""The pipeline's side of the deployment manifest (servicekit.layout)."""

from __future__ import annotations

import asyncio

import msgspec
import structlog
from redis.exceptions import RedisClusterException, RedisError

from servicekit import layout
from servicekit.backoff import Backoff

from ._calls import AnyRedis
from .config import PipelineConfig

log = structlog.get_logger(__name__)
SERVICE = "order-pipeline"
WHERE = "--redis-url"


async def agree_layout(
    client: AnyRedis, config: PipelineConfig, *, shards_given: bool
) -> tuple[PipelineConfig, layout.Manifest]:
    """Check (or write) the manifest, waiting while Redis is unreachable.

    Returns the settings with the deployment's shard count and the manifest.

    Raises:
        LayoutError: this pipeline must not run against the deployment.
    """
    # The names only: PipelineConfig validated the entries.
    regions = {entry.partition("=")[0] for entry in config.region_api}
    if config.region:
        regions.add(config.region)
    backoff = Backoff(0.1, config.backoff_max_s)
    while True:
        try:
            manifest = await layout.agree(
                client, service=SERVICE, where=WHERE, shards=config.shards,
                shards_given=shards_given, regions=regions,
            )  # fmt: skip
            break
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("redis_unreachable_checking_manifest", error=repr(exc))
            await asyncio.sleep(backoff.next_delay())
    return msgspec.structs.replace(config, shards=manifest.shards), manifest


async def watch_layout(client: AnyRedis, manifest: layout.Manifest) -> None:
    """Until cancelled, or :class:`~servicekit.layout.LayoutChanged`."""
    await layout.watch(client, manifest, service=SERVICE, where=WHERE)
