"""``fleet-sim --regions N``: the geo rig from the command line (and ``make demo-geo``).

``fleet-sim stack --regions 2`` starts the rig and keeps it up, printing each
region's URLs and the ``edge-agent --region`` flags of a device homed in each;
``fleet-sim --regions 2 --chaos "10:region-down=eu/8"`` runs the load test on
it and prints the geo verdict (exit status 1 unless it passed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import tempfile
import time
from pathlib import Path

from rich.console import Console

from schemas.names import DEFAULT_SHARDS

from ..report import summary_table, write_html
from .sim import GeoOptions, GeoResult, run_geo
from .stack import MAX_REGIONS, GeoSettings, GeoStack


def add_region_arguments(parser: argparse.ArgumentParser, *, load: bool) -> None:
    """``--regions`` (and, for the load test, the geo agents' settings)."""
    parser.add_argument(
        "--regions", type=int, default=0, choices=range(2, MAX_REGIONS + 1), metavar="N",
        help=f"geo mode: run N regions (2..{MAX_REGIONS}), each a whole stack, to test "
             "failover and partitions (default one region)",
    )  # fmt: skip
    if load:
        parser.add_argument(
            "--homes",
            default="",
            help="geo mode: home every device in this region instead of spreading them over "
            "all (default spread)",
        )


def _settings(args: argparse.Namespace) -> GeoSettings:
    shards = DEFAULT_SHARDS if args.shards is None else args.shards  # a stack it starts
    return GeoSettings(regions=args.regions, shards=shards, workers=args.workers)


def run_geo_stack(args: argparse.Namespace) -> int:
    """Start the rig, print its URLs and agent flags, keep it up until Ctrl-C."""
    with (
        tempfile.TemporaryDirectory(prefix="fleet-geo-") as tmp,
        GeoStack(Path(tmp), _settings(args)) as geo,
    ):
        for name, url in geo.urls().items():
            print(f"{name:>16}: {url}")
        for region in geo.names:
            print(
                f"{'agent @' + region:>16}: edge-agent {' '.join(geo.agent_region_flags(region))}"
            )
        print(f"logs under {tmp}; Ctrl-C stops everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


def geo_options(args: argparse.Namespace) -> GeoOptions:
    """GeoOptions from the load test's flags."""
    return GeoOptions(
        devices=args.devices, rate=args.rate, duration_s=args.duration, chaos=args.chaos,
        seed=args.seed, homes=args.homes, settle_timeout_s=args.settle_timeout,
        receipt_timeout_s=args.receipt_timeout, failover_after_s=args.failover_after,
    )  # fmt: skip


def run_geo_load(args: argparse.Namespace, console: Console | None = None) -> int:
    """Start the rig, run the load with its chaos, print the verdict; 1 unless it passed."""
    console = console or Console()
    report = args.report or Path("reports") / f"fleet-geo-{dt.datetime.now():%Y%m%d-%H%M%S}.html"
    with tempfile.TemporaryDirectory(prefix="fleet-geo-") as tmp:
        console.print(f"starting {args.regions} regions …")
        with GeoStack(Path(tmp), _settings(args)) as geo:
            started = time.monotonic()
            result = asyncio.run(run_geo(geo_options(args), geo))
            console.print(f"run took {time.monotonic() - started:,.0f} s")
    return print_geo_result(result, report, console)


def print_geo_result(result: GeoResult, report: Path, console: Console) -> int:
    """The summary, the geo verdict, the report path; the exit status."""
    console.print(summary_table(result.record))
    for line in result.lines():
        console.print(line)
    v = result.verdict
    named = (("LOST", v.lost), ("DUPLICATED", list(v.duplicated)),
             ("IN DOUBT", list(v.in_doubt)), ("MISPLACED", list(v.misplaced)),
             ("STUCK", v.stuck), ("PROCESSED TWICE", list(v.processed_twice)))  # fmt: skip
    for name, refs in named:
        if refs:
            console.print(f"{name} ({len(refs)}): {', '.join(f'{d}/{o}' for d, o in refs[:50])}")
    console.print(f"report: {write_html(result.record, report).resolve()}")
    return 0 if result.ok else 1
