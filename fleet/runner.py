"""The ``fleet-sim`` load test and ``fleet-sim stack`` from the command line (and ``make demo``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from schemas.names import DEFAULT_SHARDS
from servicekit import layout
from servicekit.credentials import read_secret_file, url_with_password
from servicekit.layout import LayoutError

from .chaos import SpikeReport, StormReport
from .devices import raise_open_file_limit
from .loops import runner
from .report import summary_table, write_html
from .sim import SimOptions, SimResult, run
from .stack import Stack, StackSettings

SHOWN_IDS = 50


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load test's flags (the contract's five first)."""
    parser.add_argument(
        "--devices",
        type=int,
        default=100,
        help="simulated devices, each a real edge agent with its own outbox and MQTT session; "
        "raise to test scale (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=50.0,
        help="orders per second offered by the whole fleet, Poisson arrivals over the devices "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds the load runs before the run settles and is verified (default %(default)s)",
    )
    parser.add_argument(
        "--mqtt-url",
        help="broker of an existing stack to load, with --redis-url; without both fleet-sim "
        "starts a local stack",
    )
    parser.add_argument(
        "--redis-url",
        help="Redis of that existing stack, read to verify every order; give it with --mqtt-url",
    )
    parser.add_argument(
        "--mqtt-password-file",
        default="",
        help="file holding the password of --mqtt-url's user on one line, so that no password "
        "sits in the command line (default none)",
    )
    parser.add_argument(
        "--redis-password-file",
        default="",
        help="file holding the password of --redis-url's user on one line, so that no password "
        "sits in the command line (default none)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="order streams of the stack; loading an existing stack, its deployment manifest "
        f"gives them (another count is refused), else {DEFAULT_SHARDS}",
    )
    parser.add_argument(
        "--chaos",
        default="",
        help="faults to inject, SECONDS:KIND[=ARG] comma-separated, e.g. "
        '"20:broker-restart,30:bridge-kill"; kinds are listed in fleet/chaos.py (default '
        "none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of arrivals and order mix; change it for another run of the same "
        "shape (default %(default)s)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=120.0,
        help="seconds to wait after the load for every order to settle before verifying; raise "
        "for big fleets or long chaos (default %(default)s)",
    )
    parser.add_argument(
        "--status-query-delay",
        type=float,
        default=3.0,
        help="seconds after its receipt that an agent asks for a status it has not heard "
        "(the agents' status_query_delay_s; default %(default)s)",
    )
    parser.add_argument(
        "--status-wait",
        type=float,
        default=30.0,
        help="seconds after settling that devices may take to hear the last statuses before "
        "those count as unheard (default %(default)s)",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=500.0,
        help="device connects per second while the fleet starts; lower it for a small broker "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--receipt-timeout",
        type=float,
        default=10.0,
        help="seconds an agent waits for a receipt before resending "
        "(the agents' receipt_timeout_s; default %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="processes the simulated devices are spread over; raise for thousands of devices "
        "to use more cores (default %(default)s)",
    )
    parser.add_argument(
        "--light-devices",
        type=int,
        default=0,
        help="how many of --devices are lightweight devices: the same MQTT wire behaviour "
        "(QoS 1, resend until a receipt, status queries, health and Will) with one shared "
        "in-memory outbox per process instead of an agent each, for high rates; -1: all "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds an idle agent waits before polling its outbox; raise for big fleets to "
        "save CPU (the agents' poll_interval_s; default %(default)s)",
    )
    parser.add_argument(
        "--failover-after",
        type=float,
        default=3.0,
        help="seconds an agent waits without a broker or an answer before it moves to the next "
        "broker (--brokers N) or region (--regions N) (the agents' failover_after_s; default "
        "%(default)s)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        help="path of the HTML report of the run (default reports/fleet-DATE-TIME.html)",
    )
    parser.add_argument(
        "--no-live",
        action="store_true",
        help="print no live progress display, e.g. when the output goes to a file or CI log",
    )
    add_stack_arguments(parser)


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the stack fleet-sim starts itself."""
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="Mosquitto brokers of the stack fleet-sim starts; the devices spread over them by "
        "a hash of their id, bridges and pipeline connect to all (default %(default)s)",
    )
    parser.add_argument(
        "--bridges",
        type=int,
        default=1,
        help="order-bridge replicas of the stack fleet-sim starts; raise to test the shared "
        "subscription (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pipeline worker processes of the stack fleet-sim starts; raise for pipeline "
        "throughput (default %(default)s)",
    )
    parser.add_argument(
        "--redis-replicas",
        type=int,
        default=0,
        help="replicas of the stack's Redis master, with three Sentinels the services find it "
        "through (and --redis-min-replicas 1); with --redis-cluster, replicas of each Cluster "
        "master; for the redis-failover and redis-freeze chaos kinds (default %(default)s)",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run Redis as a Cluster of three masters (each with --redis-replicas replicas) "
        "instead of one server or Sentinel; the services get --redis-cluster, the chaos kinds "
        "hit the master of shard 0's slot",
    )


def options_from(args: argparse.Namespace) -> SimOptions:
    """SimOptions from parsed flags, the password files read into the URLs.

    Raises:
        ConfigError: a password file cannot be read, or a URL holds a password too.
    """
    return SimOptions(
        devices=args.devices, rate=args.rate, duration_s=args.duration,
        mqtt_url=_with_password_file(args.mqtt_url, args.mqtt_password_file, "--mqtt-url"),
        redis_url=_with_password_file(args.redis_url, args.redis_password_file, "--redis-url"),
        shards=args.shards,
        chaos=args.chaos, seed=args.seed, settle_timeout_s=args.settle_timeout,
        status_wait_s=args.status_wait,
        ramp_per_s=args.ramp, receipt_timeout_s=args.receipt_timeout, live=not args.no_live,
        processes=args.processes, poll_interval_s=args.poll_interval,
        status_query_delay_s=args.status_query_delay, failover_after_s=args.failover_after,
        light_devices=args.devices if args.light_devices < 0 else args.light_devices,
    )  # fmt: skip


def _with_password_file(url: str | None, path: str, flag: str) -> str | None:
    """``url`` with the password in the file ``path`` (kept in this process, never in argv)."""
    if url is None or not path:
        return url
    return url_with_password(url, read_secret_file(path, f"{flag.removeprefix('--')} file"), flag)


def run_load(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run the load test (starting a stack when no URLs are given); 1 if anything was lost."""
    console = console or Console()
    if args.redis_url is not None:
        try:
            args.shards = asyncio.run(_deployment_shards(args.redis_url, args.shards))
        except LayoutError as exc:
            console.print(f"fleet-sim: {exc}")
            return 2
    elif args.shards is None:
        args.shards = DEFAULT_SHARDS
    options = options_from(args)
    report = args.report or Path("reports") / f"fleet-{dt.datetime.now():%Y%m%d-%H%M%S}.html"
    # Before the stack starts, so the broker inherits it: 10,000 devices are 10,000 sockets.
    raise_open_file_limit()
    with contextlib.ExitStack() as resources:
        stack = None
        if options.mqtt_url is None and options.redis_url is None:
            tmp = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
            console.print("starting the local stack …")
            stack = resources.enter_context(Stack(tmp, _stack_settings(args)))
        started = time.monotonic()
        light_only = options.light_devices >= options.devices
        result = runner(light_only=light_only)(run(options, stack))
        console.print(f"run took {time.monotonic() - started:,.0f} s")
    return print_result(result, report, console)


async def _deployment_shards(redis_url: str, shards: int | None) -> int:
    """The existing stack's shard count, from its manifest (``shards`` must agree)."""
    client = layout.connect(redis_url)
    try:
        _, manifest = await layout.read(client)
    finally:
        await client.aclose()
    if manifest is None:
        return shards or DEFAULT_SHARDS
    if shards is not None and shards != manifest.shards:
        raise layout.refusal("fleet-sim", redis_url, manifest, shards)
    return manifest.shards


def print_result(result: SimResult, report: Path, console: Console) -> int:
    """The summary, the ids of lost/duplicated/stuck orders, the report path; the exit status."""
    console.print(_summary(result))
    v = result.verdict
    named = (("LOST", v.lost), ("DUPLICATED", list(v.duplicated)), ("STUCK", v.stuck),
             ("NO TERMINAL STATUS HEARD", v.unheard),
             ("PROCESSED TWICE", list(v.processed_twice)))  # fmt: skip
    for name, refs in named:
        if refs:
            shown = ", ".join(f"{d}/{o}" for d, o in refs[:SHOWN_IDS])
            more = f" (+{len(refs) - SHOWN_IDS} more)" if len(refs) > SHOWN_IDS else ""
            console.print(f"{name} ({len(refs)}): {shown}{more}")
    if result.rogue_in_streams:
        console.print(f"ROGUE IN STREAMS: {result.rogue_in_streams[:SHOWN_IDS]}")
    if not result.settled:
        console.print("the run did not reach quiescence before the settle timeout")
    path = write_html(result.record, report)
    console.print(
        f"verification: {v.checked:,} accepted orders, {len(v.lost)} lost, "
        f"{len(v.duplicated)} duplicated, {len(v.stuck)} stuck, "
        f"{len(v.processed_twice)} processed twice, "
        f"{len(v.unheard)} without a terminal status heard -> "
        f"{'PASS' if result.ok else 'FAIL'}"
    )
    console.print(f"report: {path.resolve()}")
    return 0 if result.ok else 1


def _summary(result: SimResult) -> Table:
    table = summary_table(result.record)
    if result.chaos.flooded:
        table.add_row(
            "duplicate flood",
            f"{result.chaos.flooded:,} resent, {result.duplicate_receipts:,} duplicate receipts",
        )
    if result.chaos.rogue:
        sent = sum(r.sent for r in result.chaos.rogue)
        table.add_row("rogue payloads", f"{sent} sent, DLQ grew by {result.dlq_added}")
    for spike in result.chaos.spikes:
        table.add_row(f"spike @{spike.at_s:,.0f}s", spike_line(spike))
    for storm in result.chaos.storms:
        # The storm's event row above says the rest.
        table.add_row(f"storm @{storm.at_s:,.0f}s attempts/s", _per_second(storm))
    for restart in result.chaos.broker_restarts:
        back = "NOT all back" if restart.all_back_s is None else f"in {restart.all_back_s:.1f} s"
        table.add_row(
            f"broker restart @{restart.at_s:,.0f}s",
            f"{restart.back:,} devices back ({restart.connected_before:,} before), {back}",
        )
    for down in result.chaos.broker_downs:
        back = "NOT back" if down.all_back_s is None else f"back in {down.all_back_s:.1f} s"
        table.add_row(
            f"broker {down.index} host down @{down.at_s:,.0f}s",
            f"pid {down.pid} {'gone' if down.gone else 'ALIVE'}; {down.dropped:,} of "
            f"{down.connected_before:,} connected devices dropped, {back}",
        )
    return table


def spike_line(spike: SpikeReport) -> str:
    """A spike's outcome: peak outbox depth and drain time."""
    drained = (f"drained in {spike.drain_s:.1f} s after it" if spike.drain_s is not None
               else "NOT drained")  # fmt: skip
    return (
        f"rate ×{spike.factor:g} for {spike.duration_s:g} s: outbox depth {spike.depth_before:,} "
        f"before, peak {spike.peak_depth:,}, {drained}"
    )


def _per_second(storm: StormReport) -> str:
    shown = storm.attempts_per_s[:20]
    more = " …" if len(storm.attempts_per_s) > len(shown) else ""
    return " ".join(f"{n:,}" for n in shown) + more


def _stack_settings(args: argparse.Namespace) -> StackSettings:
    return StackSettings(
        shards=args.shards, brokers=args.brokers, bridges=args.bridges, workers=args.workers,
        redis_powercut="redis-powercut" in (getattr(args, "chaos", None) or ""),
        redis_replicas=args.redis_replicas, redis_cluster=args.redis_cluster,
        dynsec="enrol-revoke" in (getattr(args, "chaos", None) or ""),
    )  # fmt: skip


def run_stack(args: argparse.Namespace) -> int:
    """Start the stack, print its URLs, keep it up until Ctrl-C."""
    with (
        tempfile.TemporaryDirectory(prefix="fleet-stack-") as tmp,
        Stack(Path(tmp), _stack_settings(args)) as stack,
    ):
        for name, url in stack.urls().items():
            print(f"{name:>14}: {url}")
        print(f"logs under {tmp}; Ctrl-C stops everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0
