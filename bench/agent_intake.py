"""Durable intake throughput of the edge agent against raw SQLite baselines (not a test).

Prints orders/s through the Python API and HTTP with 1 and 64 concurrent
submitters, beside raw stdlib ``sqlite3`` with one commit per order and with
100 orders per transaction, all under the agent's pragmas (WAL,
synchronous=FULL, exclusive locking) with ~300-byte rows, in the same run.
Also: the same baselines through aiosqlite when it is installed, the outbox
run inline on the event loop instead of in its writer thread, and the RSS of
an idle ``edge-agent`` process started as its systemd unit starts it, with
what its imports cost.

    .venv/bin/python bench/agent_intake.py [--scale 1.0]
    .venv/bin/python bench/agent_intake.py --rss-only [--env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

import schemas
from edge_agent import AgentConfig, EdgeAgent
from edge_agent.outbox import NewOrder
from testrig.servers import free_port

ROW = b"x" * 300
PRAGMAS = ("PRAGMA locking_mode=EXCLUSIVE", "PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL")


def order_body(i: int, prefix: str) -> dict[str, Any]:
    # ~300 bytes encoded, like the rows.
    return {
        "order_id": f"{prefix}-{i:08d}",
        "currency": "EUR",
        "items": [
            {"sku": f"sku-{k:04d}-cola-330ml", "qty": 1, "unit_price": 150} for k in range(6)
        ],
        "total": 900,
        "attrs": {"site": "station-42", "lane": "3"},
    }


def raw_sqlite(path: Path, n: int, per_txn: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, payload BLOB)")
    start = time.perf_counter()
    for base in range(0, n, per_txn):
        conn.execute("BEGIN IMMEDIATE")
        for i in range(base, min(n, base + per_txn)):
            conn.execute("INSERT INTO t (k, payload) VALUES (?, ?)", (f"k{i}", ROW))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


async def aiosqlite_rate(path: Path, n: int, per_txn: int) -> float | None:
    try:
        import aiosqlite  # noqa: PLC0415 - optional, measured only when installed
    except ImportError:
        return None
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        for pragma in PRAGMAS:
            await conn.execute(pragma)
        await conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, payload BLOB)")
        start = time.perf_counter()
        for base in range(0, n, per_txn):
            await conn.execute("BEGIN IMMEDIATE")
            for i in range(base, min(n, base + per_txn)):
                await conn.execute("INSERT INTO t (k, payload) VALUES (?, ?)", (f"k{i}", ROW))
            await conn.execute("COMMIT")
        return n / (time.perf_counter() - start)


async def concurrent(n: int, workers: int, submit: Callable[[int], Awaitable[None]]) -> float:
    # Each submitter takes the next index; bodies are built outside the timing.
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await submit(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return n / (time.perf_counter() - start)


def config(tmp: Path, name: str, *, http: bool) -> AgentConfig:
    # Port 9 (discard) refuses: the publisher only backs off; intake is what we measure.
    return AgentConfig(
        device_id=f"bench-{name}",
        mqtt_url="mqtt://127.0.0.1:9",
        db=str(tmp / f"{name}.db"),
        http_enabled=http,
        http_port=0,
        max_rows=10**7,
        max_bytes=10**10,
        reconnect_min_s=5,
        reconnect_max_s=30,
    )


async def api_rate(tmp: Path, name: str, n: int, workers: int, *, inline: bool = False) -> float:
    async with EdgeAgent(config(tmp, name, http=False), inline_storage=inline) as agent:
        bodies = [order_body(i, name) for i in range(n)]

        async def submit(i: int) -> None:
            await agent.submit(bodies[i])

        return await concurrent(n, workers, submit)


def spawn_agent(tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    """An ``edge-agent`` process of its own (so the load generator gets the other core)."""
    port = free_port()
    argv = [sys.executable, "-m", "edge_agent.cli", "--device-id", f"bench-{name}"]
    argv += ["--mqtt-url", "mqtt://127.0.0.1:9", "--db", str(tmp / f"{name}.db")]
    argv += ["--http-port", str(port), "--reconnect-min-s", "5", "--log-level", "error"]
    argv += ["--max-rows", str(10**7), "--max-bytes", str(10**10)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("edge-agent did not start")


async def outbox_rate(tmp: Path, name: str, n: int, workers: int) -> float:
    """The outbox alone with pre-encoded orders: the API minus validation and encoding."""
    async with EdgeAgent(config(tmp, name, http=False)) as agent:
        payload = schemas.encode(agent.validate(order_body(0, name), seq=0))
        outbox = agent.outbox

        async def submit(i: int) -> None:
            await outbox.submit(NewOrder(f"{name}-{i:08d}", outbox.reserve_seq(), payload))

        return await concurrent(n, workers, submit)


async def http_rate(tmp: Path, name: str, n: int, workers: int) -> float:
    proc, port = spawn_agent(tmp, name)
    try:
        connector = aiohttp.TCPConnector(limit=workers)
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", connector=connector
        ) as session:
            bodies = [json.dumps(order_body(i, name)).encode() for i in range(n)]
            headers = {"Content-Type": "application/json"}

            async def submit(i: int) -> None:
                async with session.post("/v1/orders", data=bodies[i], headers=headers) as resp:
                    assert resp.status == 202, await resp.text()

            return await concurrent(n, workers, submit)
    finally:
        proc.terminate()
        proc.wait(10)


# A device installs requirements/edge.txt, which has none of the development
# venv's packages that structlog imports when it can (rich: +5.4 MB, greenlet,
# colorama: +1.2 MB); this start-up hides them.
DEV_ONLY_OPTIONAL = ("rich", "greenlet", "colorama")
_AS_ON_A_DEVICE = (
    "import sys\n"
    f"for name in {DEV_ONLY_OPTIONAL!r}: sys.modules[name] = None\n"
    "from edge_agent.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


UNIT = Path(__file__).resolve().parents[1] / "edge_agent" / "edge-agent.service"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The variables the agent's systemd unit sets (its ``Environment=NAME=value`` lines)."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            env[name] = value
    return env


EXTRA_ENV: dict[str, str] = {}  # --env NAME=VALUE: a lever tried on the device's start


def device_env(tmp: Path) -> dict[str, str]:
    """The environment of an agent started by its systemd unit, with its bytecode compiled.

    pip compiles every module to .pyc when it installs the device's venv; this
    machine's environment may set PYTHONDONTWRITEBYTECODE, and then every start
    compiles each module from source, which leaves ~1 MB more heap mapped.
    The cache goes to ``tmp``; :func:`idle_rss_mb` fills it with a first start.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    env.update(unit_environment())
    env.update(EXTRA_ENV)
    return env


# What the agent imports besides its own code (ctypes: its malloc_trim).
DEPENDENCIES = (
    "ctypes", "asyncio", "sqlite3", "argparse", "msgspec", "structlog", "aiohttp.web",
    "paho.mqtt.client", "schemas",
)  # fmt: skip


def import_rss_mb(tmp: Path, *modules: str) -> float:
    """VmRSS of a fresh interpreter, started as on a device, after importing ``modules``."""
    code = (
        _AS_ON_A_DEVICE.partition("from edge_agent.cli")[0]
        + f"import {', '.join((*DEPENDENCIES, *modules))}\n"
        + "ctypes.CDLL(None).malloc_trim(0)\n"
        + "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=device_env(tmp), check=True, capture_output=True
    )
    return int(out.stdout) / 1024


def print_rss(tmp: Path) -> None:
    """Idle RSS in both venvs, and what the dependencies and the agent's imports cost."""
    rss_dev = idle_rss_mb(tmp)
    rss = idle_rss_mb(tmp, as_on_a_device=True)
    print(
        f"idle edge-agent RSS: {rss:.1f} MB as the device's unit starts it "
        f"(goal <= 40 MB: {'met' if rss <= 40 else 'NOT met'}); "
        f"{rss_dev:.1f} MB in the development venv (structlog also imports "
        f"{', '.join(DEV_ONLY_OPTIONAL)} there; every module compiled at start "
        "when PYTHONDONTWRITEBYTECODE is set)"
    )
    deps = import_rss_mb(tmp)
    print(f"imports, as on a device: the dependencies ({' '.join(DEPENDENCIES)}) {deps:.1f} MB")
    for extra in ("edge_agent.cli", "prometheus_client", "importlib.metadata"):
        print(f"  + {extra}: {import_rss_mb(tmp, extra) - deps:+.1f} MB")


def idle_rss_mb(tmp: Path, *, as_on_a_device: bool = False) -> float:
    """VmRSS of an idle ``edge-agent`` 2 s after its /healthz first answers.

    As on a device, the agent starts twice and the second start is measured:
    the first one compiles (and caches) the bytecode of every module it loads.
    """
    if not as_on_a_device:
        return _idle_rss_mb(tmp, ["-m", "edge_agent.cli"], None)
    env = device_env(tmp)
    _idle_rss_mb(tmp, ["-c", _AS_ON_A_DEVICE], env)
    return _idle_rss_mb(tmp, ["-c", _AS_ON_A_DEVICE], env)


def _idle_rss_mb(tmp: Path, start: list[str], env: dict[str, str] | None) -> float:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            *start,
            "--device-id",
            "bench-rss",
            "--mqtt-url",
            "mqtt://127.0.0.1:9",
            "--db",
            str(tmp / "rss.db"),
            "--http-port",
            str(port),
            "--reconnect-min-s",
            "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        time.sleep(2.0)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kb / 1024
    finally:
        proc.terminate()
        proc.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply order counts")
    parser.add_argument(
        "--rss-only", action="store_true", help="only the idle agent's RSS and its imports' cost"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set this in the device-like agent's environment (a lever to try); repeatable",
    )
    args = parser.parse_args()
    EXTRA_ENV.update(item.split("=", 1) for item in args.env)
    if args.rss_only:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp_name:
            print_rss(Path(tmp_name))
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    def n(count: int) -> int:
        return max(100, int(count * args.scale))

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp_name:
        tmp = Path(tmp_name)
        results: dict[str, float | None] = {}
        results["sqlite3 commit/order"] = raw_sqlite(tmp / "b1.db", n(4000), 1)
        results["sqlite3 100/txn (ceiling)"] = raw_sqlite(tmp / "b100.db", n(40000), 100)
        results["aiosqlite commit/order"] = await aiosqlite_rate(tmp / "a1.db", n(2000), 1)
        results["aiosqlite 100/txn"] = await aiosqlite_rate(tmp / "a100.db", n(10000), 100)
        results["API x1"] = await api_rate(tmp, "api1", n(3000), 1)
        results["API x64"] = await api_rate(tmp, "api64", n(40000), 64)
        results["outbox only x64 (pre-encoded orders)"] = await outbox_rate(
            tmp, "ob64", n(40000), 64
        )
        results["API x64, inline (no writer thread)"] = await api_rate(
            tmp, "inl64", n(40000), 64, inline=True
        )
        results["HTTP x1 (agent in its own process)"] = await http_rate(tmp, "http1", n(2000), 1)
        results["HTTP x64 (agent in its own process)"] = await http_rate(
            tmp, "http64", n(10000), 64
        )

    ceiling = results["sqlite3 100/txn (ceiling)"] or 1.0
    per_order = results["sqlite3 commit/order"] or 1.0
    print(f"{'path':<42} {'orders/s':>10} {'vs ceiling':>11} {'vs commit/order':>16}")
    for name, rate in results.items():
        if rate is None:
            print(f"{name:<42} {'(not installed)':>10}")
            continue
        print(f"{name:<42} {rate:>10.0f} {rate / ceiling:>10.0%} {rate / per_order:>15.1f}x")
    api64 = results["API x64"] or 0.0
    print(
        f"\ngoal API x64 >= 50% of ceiling: {api64 / ceiling:.0%} "
        f"({'met' if api64 >= 0.5 * ceiling else 'NOT met'}); "
        f">= 4x commit/order: {api64 / per_order:.1f}x"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp_name:
        print_rss(Path(tmp_name))


if __name__ == "__main__":
    asyncio.run(main())
