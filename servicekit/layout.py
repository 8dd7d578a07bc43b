"""The deployment manifest: the shard layout every service that touches the streams shares.

One JSON string at ``MANIFEST_KEY`` (schemas/names.py) in each region's Redis
holds the shard count, the region names and the contract version. The first
service to start writes it (atomically, if absent); every service compares it
at start with :func:`agree`:

- another contract version, or a ``--shards`` given explicitly (flag,
  ``ORDERS_SHARDS`` or the TOML file) that differs: :class:`LayoutMismatch`,
  the service refuses to run;
- ``--shards`` not given: the service adopts the deployment's count (logged);
- a shard-count change in progress (``order-pipeline layout set``):
  :class:`LayoutChanging`, the service refuses until it is done;
- region names the manifest lacks are added (regions are rolled out one
  service at a time, so a difference there is news, not a conflict).

While a service runs, :func:`watch` re-reads the manifest every few seconds
(one GET) and ends the service with :class:`LayoutChanged` once it no longer
describes the layout the service runs with.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from schemas.names import CONTRACT_VERSION as _CONTRACT_NUMBER
from schemas.names import MANIFEST_KEY

from . import redis_clients
from .redis_clients import text

log = structlog.get_logger(__name__)

CONTRACT_VERSION: Final = f"v{_CONTRACT_NUMBER}"  # as the manifest stores it

WATCH_INTERVAL_S: Final = 5.0
FIX_DOC: Final = "docs/how-to/change-shards.md"
_CAS_ATTEMPTS: Final = 10
# Compare-and-set on the one manifest key: ARGV[1] "" means "only if absent".
_CAS: Final = """
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class LayoutError(Exception):
    """The deployment manifest does not allow this service to run as configured."""


class LayoutMismatch(LayoutError):
    """This service's shard count or contract differs from the deployment's."""


class LayoutChanging(LayoutError):
    """A shard-count change (``order-pipeline layout set``) is in progress."""


class LayoutChanged(LayoutError):
    """The manifest changed under a running service."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """One deployment's layout; ``changing_to`` is non-zero while ``layout set`` runs."""

    shards: int
    regions: tuple[str, ...] = ()
    contract: str = CONTRACT_VERSION
    changing_to: int = 0

    def encode(self) -> str:
        """The stored form: compact JSON with sorted keys (so equal manifests compare equal)."""
        body: dict[str, Any] = {
            "shards": self.shards,
            "regions": sorted(self.regions),
            "contract": self.contract,
        }
        if self.changing_to:
            body["changing_to"] = self.changing_to
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> Manifest:
        """Parse a stored manifest.

        Raises:
            LayoutError: not a manifest this code understands.
        """
        try:
            body = json.loads(text(raw))
            shards, regions = body["shards"], body.get("regions", [])
            contract, changing_to = body["contract"], body.get("changing_to", 0)
        except (ValueError, KeyError, TypeError) as exc:
            raise LayoutError(f"{MANIFEST_KEY} holds no manifest: {text(raw)[:200]!r}") from exc
        if not (isinstance(shards, int) and shards >= 1 and isinstance(changing_to, int)):
            raise LayoutError(f"{MANIFEST_KEY} holds a bad shard count: {text(raw)[:200]!r}")
        return cls(int(shards), tuple(str(r) for r in regions), str(contract), changing_to)


AnyRedis = aioredis.Redis | RedisCluster


def connect(
    url: str,
    *,
    cluster: bool = False,
    timeout_s: float = 5.0,
    sentinels: Sequence[str] = (),
    sentinel_master: str = "",
) -> AnyRedis:
    """A client for the manifest checks (see :func:`servicekit.redis_clients.connect`)."""
    return redis_clients.connect(
        url,
        timeout_s=timeout_s,
        cluster=cluster,
        sentinels=sentinels,
        sentinel_master=sentinel_master,
    )


async def read(client: AnyRedis) -> tuple[str | None, Manifest | None]:
    """The stored manifest, raw and parsed; (None, None) when there is none."""
    raw = await client.get(MANIFEST_KEY)
    if raw is None:
        return None, None
    return text(raw), Manifest.decode(raw)


async def swap(client: AnyRedis, old: str | None, new: Manifest) -> bool:
    """Store ``new`` only if the manifest is still ``old`` (None: still absent)."""
    # EVALSHA (SCRIPT LOAD on NOSCRIPT): the services' ACLs allow no EVAL.
    script = client.register_script(_CAS)
    done = await script(keys=[MANIFEST_KEY], args=[old or "", new.encode()])
    return bool(done)


def refusal(service: str, where: str, current: Manifest, shards: int) -> LayoutMismatch:
    """The error a service with an explicit ``--shards`` other than the deployment's gets."""
    return LayoutMismatch(
        f"{service}: --shards {shards} does not match this deployment's {current.shards} "
        f"shards (Redis key {MANIFEST_KEY} at {where}). Fix: start it with --shards "
        f"{current.shards} (or without --shards, to adopt the deployment's), or change the "
        f"deployment to {shards} shards with `order-pipeline layout set --shards {shards}` "
        f"({FIX_DOC})"
    )


def check(current: Manifest, *, service: str, where: str, shards: int, shards_given: bool) -> None:
    """Raise the :class:`LayoutError` that forbids running with ``shards`` against ``current``."""
    if current.contract != CONTRACT_VERSION:
        raise LayoutMismatch(
            f"{service}: speaks contract {CONTRACT_VERSION} but this deployment runs "
            f"{current.contract} (Redis key {MANIFEST_KEY} at {where}). Fix: run the "
            f"release that speaks {current.contract}"
        )
    if current.changing_to:
        raise LayoutChanging(
            f"{service}: the deployment's shard count is being changed from {current.shards} "
            f"to {current.changing_to} (Redis key {MANIFEST_KEY} at {where}). Fix: start it "
            f"once `order-pipeline layout set --shards {current.changing_to}` has finished, "
            f"or run that command again to finish it ({FIX_DOC})"
        )
    if shards_given and shards != current.shards:
        raise refusal(service, where, current, shards)


async def agree(
    client: AnyRedis,
    *,
    service: str,
    where: str,
    shards: int,
    shards_given: bool,
    regions: Iterable[str] = (),
) -> Manifest:
    """Write the manifest if there is none, else check this service against it.

    Returns the manifest to run with (its ``shards`` is the count to use).

    Raises:
        LayoutError: the service must not run (see the module's docstring).
    """
    wanted_regions = set(regions)
    for _ in range(_CAS_ATTEMPTS):
        raw, current = await read(client)
        if current is None:
            manifest = Manifest(shards, tuple(sorted(wanted_regions)))
            if await swap(client, None, manifest):
                log.info("deployment manifest written", service=service, where=where,
                         manifest=manifest.encode())  # fmt: skip
                return manifest
            continue  # another service wrote it first: compare with that one
        check(current, service=service, where=where, shards=shards, shards_given=shards_given)
        if not wanted_regions <= set(current.regions):
            merged = replace(current, regions=tuple(sorted(wanted_regions | set(current.regions))))
            if not await swap(client, raw, merged):
                continue
            log.info("regions added to the deployment manifest", service=service, where=where,
                     regions=merged.regions)  # fmt: skip
            current = merged
        if current.shards != shards:
            log.warning("adopting the deployment's shard count (no --shards given)",
                        service=service, where=where, shards=current.shards,
                        default=shards)  # fmt: skip
        return current
    raise LayoutError(f"{service}: {MANIFEST_KEY} at {where} kept changing while read")


async def watch(
    client: AnyRedis,
    running: Manifest,
    *,
    service: str,
    where: str,
    interval_s: float = WATCH_INTERVAL_S,
) -> None:
    """Re-read the manifest every ``interval_s`` until it stops describing ``running``.

    A manifest that vanished (a flushed or replaced Redis) is written again.
    Redis errors are ignored here: the service's own probes report them.

    Raises:
        LayoutChanged: the shard count or contract changed, or a change began.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            raw, current = await read(client)
            if current is None:
                if await swap(client, None, running):
                    log.warning("deployment manifest was missing: written again",
                                service=service, where=where)  # fmt: skip
                continue
        except (RedisError, RedisClusterException, OSError):
            continue
        changed = (current.shards, current.contract, current.changing_to) != (
            running.shards,
            running.contract,
            0,
        )
        if changed:
            log.critical("the deployment's layout changed under this service: stopping",
                         service=service, where=where, running=running.encode(),
                         manifest=raw)  # fmt: skip
            raise LayoutChanged(
                f"{service}: the deployment manifest at {where} changed from {running.encode()} "
                f"to {raw}; start the service again ({FIX_DOC})"
            )


def refusal_in(exc: BaseException) -> LayoutError | None:
    """The :class:`LayoutError` that ``exc`` is or holds (in exception groups), if any."""
    if isinstance(exc, LayoutError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := refusal_in(inner)) is not None:
                return found
    return None
