"""``order-pipeline``: the workers and the orders API, one worker, or a catalog load.

Usage::

    order-pipeline [run] --mqtt-url … --redis-url … --http-port 8082 --workers 2
    order-pipeline worker --mqtt-url … --redis-url …      # one worker, no API
    order-pipeline catalog load FILE --redis-url …         # JSON or TOML
    order-pipeline migrate --redis-url … --shards N        # from the pre-cluster layout
    order-pipeline layout show|set --shards N --redis-url … # the deployment manifest
    order-pipeline token new --role operate [--name N] [--tokens-file F]
    order-pipeline devices retry-held DEVICE_ID… | --all --mqtt-url …   # release held orders
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisClusterException, RedisError

from schemas import RETRY_HELD
from schemas.ids import is_device_id
from servicekit import tracing
from servicekit.config import (
    ConfigError,
    add_config_arguments,
    given_fields,
    load_config,
    secret_flags_given,
)
from servicekit.credentials import warn_if_redis_unauthenticated, warn_secret_flags
from servicekit.layout import read as read_manifest
from servicekit.layout import refusal_in
from servicekit.logs import configure_logging
from servicekit.loops import failed_loops
from servicekit.version import add_version_argument

from .api_tokens import ROLES, Role, digest_line, new_token, valid_name, write_entry
from .catalog import read_catalog, store_catalog
from .config import PipelineConfig
from .device_commands import send_command
from .errors import PipelineError
from .layout import agree_layout
from .migrate import migrate
from .reshard import SETTLE_S, set_shards
from .service import install_stop_signals, redis_client, run_service, run_worker

log = structlog.get_logger(__name__)
_COMMANDS = {
    "run",
    "worker",
    "catalog",
    "migrate",
    "layout",
    "token",
    "devices",
    "-h",
    "--help",
    "--version",
}
# Exit codes of `devices retry-held`: every command delivered, bad usage, some not
# delivered (no subscriber, or refused by the broker), broker unreachable.
EXIT_DELIVERED, EXIT_USAGE, EXIT_NOT_DELIVERED, EXIT_UNREACHABLE = 0, 2, 3, 4


def build_parser() -> argparse.ArgumentParser:
    """The parser: subcommands ``run`` (default), ``worker`` and ``catalog load``."""
    parser = argparse.ArgumentParser(
        prog="order-pipeline",
        description="pipeline workers and the orders API; without a subcommand, `run`",
    )
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="orders API on --http-port plus --workers worker processes")
    add_config_arguments(run, PipelineConfig)
    worker = sub.add_parser("worker", help="one worker process, no API")
    add_config_arguments(worker, PipelineConfig)
    catalog = sub.add_parser("catalog", help="catalog administration")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    load = catalog_sub.add_parser("load", help="load a JSON or TOML catalog into Redis")
    load.add_argument(
        "file",
        type=Path,
        help="catalog file, JSON or TOML as pipeline/demo_catalog.toml; sets the price and "
        "stock of each SKU it lists",
    )
    add_config_arguments(load, PipelineConfig)
    migrate_cmd = sub.add_parser(
        "migrate", help="move stock and records from the layout before Redis Cluster support"
    )
    add_config_arguments(migrate_cmd, PipelineConfig)
    layout_cmd = sub.add_parser("layout", help="the deployment manifest (shard count)")
    layout_sub = layout_cmd.add_subparsers(dest="layout_command", required=True)
    show = layout_sub.add_parser("show", help="print the deployment manifest")
    add_config_arguments(show, PipelineConfig)
    change = layout_sub.add_parser(
        "set",
        help="change the deployment's shard count (docs/how-to/change-shards.md): with the "
        "bridges stopped and the streams drained, moves every key to its new shard",
    )
    add_config_arguments(change, PipelineConfig)
    change.add_argument(
        "--settle-s",
        type=float,
        default=SETTLE_S,
        help="seconds to wait after marking the change, so running services notice it and "
        f"stop (default {SETTLE_S:g}, a little over their manifest check interval)",
    )
    token = sub.add_parser("token", help="orders API bearer tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = token_sub.add_parser(
        "new", help="mint a token: the token goes to stdout, only its hash is stored"
    )
    new.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="what the token may do: read (orders, DLQ listing, metrics) or operate (also DLQ "
        "replay and resolve)",
    )
    new.add_argument(
        "--name",
        default="",
        help="label of the token in the API's logs, 1-64 of letters, digits and _.@- "
        "(default empty)",
    )
    new.add_argument(
        "--tokens-file",
        type=Path,
        default=None,
        help="tokens file to append the hashed entry to (created 0644: digests only); without "
        "it the entry is printed for you to store",
    )
    _add_devices(sub)
    return parser


def _add_devices(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    devices = sub.add_parser("devices", help="commands to devices over MQTT (device commands)")
    devices_sub = devices.add_subparsers(dest="devices_command", required=True)
    retry = devices_sub.add_parser(
        "retry-held",
        help="ask devices to re-queue their held orders, as `edge-agent retry --held` does "
        "on a device; exit 0 delivered, 2 usage, 3 some not delivered, 4 broker unreachable",
    )
    retry.add_argument(
        "device_ids",
        nargs="*",
        metavar="DEVICE_ID",
        help="devices to ask, each on its own command topic (or give --all instead)",
    )
    retry.add_argument(
        "--all",
        action="store_true",
        help="ask every device at once, with one message on the fleet-wide command topic",
    )
    retry.add_argument(
        "--wait-s",
        type=float,
        default=10.0,
        help="seconds to wait for the broker, and again for its PUBACKs (default %(default)s)",
    )
    add_config_arguments(retry, PipelineConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``order-pipeline``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in _COMMANDS:
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    if args.command in _OWN_SETUP:
        return _OWN_SETUP[args.command](args)
    try:
        config = load_config(PipelineConfig, args)
        shards_given = "shards" in given_fields(PipelineConfig, args)
    except ConfigError as exc:
        print(f"order-pipeline: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, service="order-pipeline")
    warn_secret_flags(secret_flags_given(PipelineConfig, args))
    warn_if_redis_unauthenticated(config.redis_url)
    try:
        return _run_command(args, config, shards_given=shards_given)
    except (PipelineError, RedisError, RedisClusterException, OSError) as exc:
        log.exception("fatal", error=repr(exc))
        return 1
    except Exception as exc:
        if (refusal := refusal_in(exc)) is not None:
            log.error("refused_to_run", error=str(refusal))  # noqa: TRY400
            print(f"order-pipeline: {refusal}", file=sys.stderr)
            return 2
        loops = failed_loops(exc)
        if not loops:
            raise
        log.critical("exiting: a background loop failed", loops=[f.loop for f in loops])
        return 1
    finally:
        tracing.shutdown()  # export the spans still buffered


def _run_command(args: argparse.Namespace, config: PipelineConfig, *, shards_given: bool) -> int:
    if args.command == "catalog":
        return asyncio.run(_load_catalog(config, args.file, shards_given=shards_given))
    if args.command == "migrate":
        return asyncio.run(_migrate(config, shards_given=shards_given))
    if args.command == "layout":
        if args.layout_command == "set" and not shards_given:
            print("order-pipeline: layout set needs --shards N", file=sys.stderr)
            return 2
        settle_s = getattr(args, "settle_s", SETTLE_S)
        return asyncio.run(_layout(config, args.layout_command, settle_s))
    tracing.configure(
        config.otlp_endpoint, sample_ratio=config.trace_sample_ratio,
        service_name="order-pipeline",
    )  # fmt: skip
    worker_only = args.command == "worker"
    return _runner()(_serve(config, worker_only=worker_only, shards_given=shards_given))


def _runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop's runner where it is installed (the cloud extras), else asyncio's.

    A worker at a fleet's rates handles a few orders per batch, so the event loop's
    own work per wake-up (selector, callbacks, socket writes in Python) is a large
    part of its CPU per order; uvloop does it in C, as it does for the bridge.
    """
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on Windows
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _serve(config: PipelineConfig, *, worker_only: bool, shards_given: bool) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    if worker_only:
        await run_worker(config, stop, shards_given=shards_given)
    else:
        await run_service(config, stop, shards_given=shards_given)
    return 0


async def _load_catalog(config: PipelineConfig, path: Path, *, shards_given: bool) -> int:
    catalog = read_catalog(path)
    client = redis_client(config)
    try:
        config, _ = await agree_layout(client, config, shards_given=shards_given)
        await store_catalog(client, catalog, shards=config.shards)
    finally:
        await client.aclose()
    log.info("catalog_loaded", file=str(path), skus=len(catalog.items))
    return 0


async def _migrate(config: PipelineConfig, *, shards_given: bool) -> int:
    if config.redis_cluster:
        print("order-pipeline: migrate runs on the single Redis of the old layout", file=sys.stderr)
        return 2
    client = redis_client(config)
    assert isinstance(client, aioredis.Redis)  # not a cluster: refused above
    try:
        config, _ = await agree_layout(client, config, shards_given=shards_given)
        done = await migrate(client, config.shards)
    finally:
        await client.aclose()
    log.info("migrated", skus=done.skus, orders=done.orders, shards=config.shards)
    return 0


async def _layout(config: PipelineConfig, command: str, settle_s: float) -> int:
    client = redis_client(config)
    try:
        if command == "show":
            raw, _ = await read_manifest(client)
            print(raw or "no deployment manifest")
            return 0
        moved = await set_shards(client, config.shards, settle_s=settle_s)
    finally:
        await client.aclose()
    print(f"order-pipeline: the deployment now has {config.shards} shards; moved "
          f"{dict(moved.keys)}, stock of {moved.skus} SKUs spread", file=sys.stderr)  # fmt: skip
    return 0


def _devices(args: argparse.Namespace) -> int:
    """``devices retry-held``: needs the MQTT settings only, and no Redis."""
    device_ids: list[str] = args.device_ids
    if args.all == bool(device_ids):
        print("order-pipeline: give DEVICE_IDs or --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    bad = [device_id for device_id in device_ids if not is_device_id(device_id)]
    if bad:
        print(f"order-pipeline: not device ids: {bad}", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(PipelineConfig, args)
    except ConfigError as exc:
        print(f"order-pipeline: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level, service="order-pipeline")
    return _retry_held(config, device_ids, every=args.all, wait_s=args.wait_s)


def _retry_held(
    config: PipelineConfig, device_ids: list[str], *, every: bool, wait_s: float
) -> int:
    sent = asyncio.run(
        send_command(
            config.mqtt_url,
            RETRY_HELD,
            None if every else device_ids,
            ca_file=config.mqtt_ca_file,
            timeout_s=wait_s,
        )
    )
    if sent is None:
        print(json.dumps({"error": "broker_unreachable"}), file=sys.stderr)
        return EXIT_UNREACHABLE
    for one in sent:
        line = {"device_id": one.target, "topic": one.topic, "command_id": one.command_id,
                "result": one.outcome, "puback": one.code}  # fmt: skip
        print(json.dumps(line))
    if all(one.outcome == "delivered" for one in sent):
        return EXIT_DELIVERED
    return EXIT_NOT_DELIVERED


def _new_token(role: Role, name: str, tokens_file: Path | None) -> int:
    if name and not valid_name(name):
        print("order-pipeline: --name takes 1-64 of A-Z a-z 0-9 _ . @ -", file=sys.stderr)
        return 2
    token = new_token()
    line = digest_line(token, role, name)
    if tokens_file is not None:
        write_entry(tokens_file, line)
        print(f"order-pipeline: added a {role} token to {tokens_file}", file=sys.stderr)
    else:
        print(f"order-pipeline: store this line in the tokens file:\n{line}", file=sys.stderr)
    print(token)
    return 0


def _token(args: argparse.Namespace) -> int:
    return _new_token(args.role, args.name, args.tokens_file)


# Subcommands that need no pipeline service setup (no Redis, no tracing).
_OWN_SETUP: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "token": _token,
    "devices": _devices,
}

if __name__ == "__main__":
    sys.exit(main())
