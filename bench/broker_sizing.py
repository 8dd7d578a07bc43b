"""How many device connections one Mosquitto holds, configured as in production.

Not a test. The broker runs the committed ``mosquitto/secure.conf`` (TLS 1.2 on
an ECDSA P-256 certificate from ``enrolment.pki``, the dynamic-security plugin,
persistence with its 30 s autosave, connection messages logged), with one
device account per simulated device written by ``enrolment.dynsec`` (bound
client id ``edge-{id}``, its own role, PBKDF2 password) plus the ``bridge``
and ``pipeline`` service accounts. Each device does what an agent does on the
wire (docs/explanation/brokers.md, "Sizing"):

* TLS, then an MQTT 5 CONNECT as its own account (clean start off, the
  agent's 7-day session expiry, its 30 s keep-alive, a QoS 1 Will on its
  health topic), then SUBSCRIBE to its receipts and status topics at QoS 1;
* PINGREQ when it sent nothing for a keep-alive;
* under load, one QoS 1 PUBLISH of ``--payload`` bytes on its orders topic
  every ``--interval`` seconds (phases spread over the fleet).

A ``bridge`` client holds the shared subscription on every device's orders and
a ``pipeline`` client the one on their health (the Wills), both acking at QoS 1.

Phases, each measured on the broker process alone (/proc: CPU time, RSS):

1. connect every device (``--connects`` TLS handshakes in flight per client
   process), then the broker's RSS against its RSS before any device;
2. ``--idle-s`` of idle keep-alive: the broker's CPU share;
3. ``--load-s`` at one message per device every ``--interval`` s: its CPU share
   and the messages the bridge client received;
4. a reconnection storm: every client process aborts all its connections at
   once (TCP RST, as a network cut or a load balancer's restart looks to the
   broker) and reconnects them all at once (``--storm-spread-s``: each after a
   uniform draw from [0, S]); the time until every device has its SUBACK again,
   the CPU the broker and the clients spent meanwhile, the broker's run-queue
   wait, the SYNs the kernel dropped on its full accept queue, the connect
   attempts and TLS handshakes, and the Wills heard (counted until none came
   for 5 s) with the time to the last one. ``--perf FILE`` profiles the broker
   through the storm (``perf record``) and reports its top functions.

``--idle-s 0`` / ``--load-s 0`` skip phases 2 / 3. ``--agent-retry`` makes the
devices time out and back off as the edge agent does (its defaults, or
``--reconnect-min-s``); ``--offline N`` has N more devices connect once and
leave before the phases, so their sessions wait on the broker as an offline
device's do. docs/explanation/brokers.md has the figures and what they say.

The devices run in ``--procs`` processes, each from its own loopback address
(127.0.0.2, …) so no process runs short of ephemeral ports; the bench raises
its soft file limit (and so the broker's and its clients') to the devices plus
a small margin; past the hard limit (``ulimit -Hn``) raising it needs
CAP_SYS_RESOURCE.

Run: .venv/bin/python -m bench.broker_sizing --devices 10000 [--procs 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import ssl
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgspec

from edge_agent.config import AgentConfig
from edge_agent.transport import TransportSettings
from enrolment.dynsec import Accounts, device_client_id, health_topic
from enrolment.pki import create_ca, issue_cert
from schemas import Health, encode, names
from servicekit.backoff import full_jitter
from servicekit.mqtt_varint import decode_varint, encode_varint
from testrig.procstat import process_cpu_s
from testrig.servers import MosquittoProcess, find_dynsec_plugin, free_port

REPO = Path(__file__).resolve().parents[1]
KEEPALIVE_S = 30  # edge_agent.transport's default
SESSION_EXPIRY_S = 7 * 24 * 3600
CONNECT_TIMEOUT_S = 60.0
FD_MARGIN = 50  # the broker's listener, epoll, log, files; the services
WILLS_QUIET_S = 5.0  # the Wills have stopped coming when none came for this long
WILLS_MAX_WAIT_S = 300.0

# --- MQTT 5, the few packets a device sends ---


def _str(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_varint(len(body)) + body


def connect_packet(
    client_id: str, username: str, password: str, will: tuple[str, bytes] | None
) -> bytes:
    """CONNECT: clean start off, session expiry and keep-alive as the agent's."""
    flags = 0x80 | 0x40  # username, password; clean start off
    payload = _str(client_id.encode())
    if will is not None:
        flags |= 0x04 | 0x08  # Will at QoS 1
        payload += b"\x00" + _str(will[0].encode()) + _str(will[1])
    payload += _str(username.encode()) + _str(password.encode())
    props = b"\x11" + struct.pack("!I", SESSION_EXPIRY_S)
    header = _str(b"MQTT") + bytes([5, flags]) + struct.pack("!H", KEEPALIVE_S)
    return _packet(0x10, header + encode_varint(len(props)) + props + payload)


def subscribe_packet(topics: tuple[str, ...]) -> bytes:
    body = struct.pack("!H", 1) + b"\x00" + b"".join(_str(t.encode()) + b"\x01" for t in topics)
    return _packet(0x82, body)


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    return _packet(0x32, _str(topic) + struct.pack("!H", packet_id) + b"\x00" + payload)


PINGREQ = b"\xc0\x00"


def split_packets(data: bytearray) -> list[tuple[int, bytes]]:
    """(first byte, body) of each whole packet in ``data``; consumed bytes are removed."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset + 2 <= len(data):
        decoded = decode_varint(data, offset + 1)
        if decoded is None:
            break
        length, pos = decoded
        if pos + length > len(data):
            break
        out.append((data[offset], bytes(data[pos : pos + length])))
        offset = pos + length
    del data[:offset]
    return out


# --- a client: one MQTT connection over TLS ---


class Client(asyncio.Protocol):
    """One device (or service) connection: CONNECT, SUBSCRIBE, then acks and pings."""

    def __init__(self, client_id: str, username: str, password: str,
                 topics: tuple[str, ...], will: tuple[str, bytes] | None) -> None:  # fmt: skip
        self.connect = connect_packet(client_id, username, password, will)
        self.subscribe = subscribe_packet(topics)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] | None = None
        self.buffer = bytearray()
        self.last_write = 0.0
        self.packet_id = 0
        self.received = 0
        self.last_receive_at = 0.0
        self.acked = 0
        self.lost_unexpectedly = 0
        self.dropping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        self.buffer.clear()
        self.write(self.connect)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.last_write = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("lost before SUBACK"))
        elif not self.dropping:
            self.lost_unexpectedly += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        for first, body in split_packets(self.buffer):
            kind = first & 0xF0
            if kind == 0x30:  # PUBLISH (QoS 1: topic, packet id)
                self.received += 1
                self.last_receive_at = time.monotonic()
                (topic_len,) = struct.unpack_from("!H", body, 0)
                out.append(b"\x40\x02" + body[2 + topic_len : 4 + topic_len])
            elif kind == 0x40:
                self.acked += 1
            elif kind == 0x20 and self.ready is not None and not self.ready.done():
                if len(body) < 2 or body[1] != 0:
                    self.ready.set_exception(ConnectionError(f"CONNACK {body[1:2]!r}"))
                else:
                    out.append(self.subscribe)
            elif kind == 0x90 and self.ready is not None and not self.ready.done():
                if any(code >= 0x80 for code in body[3:]):
                    self.ready.set_exception(ConnectionError(f"SUBACK {body[3:]!r}"))
                else:
                    self.ready.set_result(None)
        if out:
            self.write(b"".join(out))

    def next_packet_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id


def agent_retry(reconnect_min_s: float | None) -> tuple[float, float, float]:
    """(connect timeout, first backoff window, backoff cap) in s: the edge agent's
    defaults, with ``reconnect_min_s`` instead of its own if given."""
    config = {f.name: f.default for f in msgspec.structs.fields(AgentConfig)}
    timeout = {f.name: f.default for f in dataclasses.fields(TransportSettings)}
    return (
        cast(float, timeout["connect_timeout_s"]),
        cast(float, config["reconnect_min_s"]) if reconnect_min_s is None else reconnect_min_s,
        cast(float, config["reconnect_max_s"]),
    )


@dataclass
class Target:
    port: int
    tls: ssl.SSLContext
    source_ip: str | None = None
    # (connect timeout, first backoff window, cap) as the agent retries; None: the
    # bench's own (60 s, then a uniform 0.2–1 s wait)
    agent: tuple[float, float, float] | None = None
    attempts: int = 0
    handshakes: int = 0  # attempts that got past accept and TLS (connection_made)
    attempts_failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def open_client(client: Client, target: Target) -> None:
    """Connect ``client`` until its SUBACK, retrying after a short random wait."""
    loop = asyncio.get_running_loop()
    timeout_s = target.agent[0] if target.agent else CONNECT_TIMEOUT_S
    failures = 0
    while True:
        client.ready = loop.create_future()
        client.dropping = False
        target.attempts += 1
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(
                    lambda: client, "127.0.0.1", target.port, ssl=target.tls,
                    server_hostname="localhost",
                    local_addr=(target.source_ip, 0) if target.source_ip else None,
                )  # fmt: skip
                target.handshakes += 1
                await client.ready
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            target.attempts_failed += 1
            name = type(exc).__name__
            target.errors[name] = target.errors.get(name, 0) + 1
            if client.transport is not None:
                # Given up: its connection_lost is neither news nor a loss to count.
                client.ready, client.dropping = None, True
                client.transport.abort()
            if target.agent:
                await asyncio.sleep(full_jitter(failures, target.agent[1], target.agent[2]))
                failures += 1
            else:
                await asyncio.sleep(random.uniform(0.2, 1.0))
        else:
            return


def tls_context(cafile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def device_password(secret: str, device_id: str) -> str:
    return hashlib.sha256(f"{secret}:{device_id}".encode()).hexdigest()[:32]


def device_id(index: int) -> str:
    return f"sz-{index:06d}"


# --- a client process: a slice of the fleet ---


class Slice:
    """``count`` devices from ``first`` on, driven by commands on stdin."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.target = Target(
            args.port,
            tls_context(Path(args.cafile)),
            args.source_ip,
            agent_retry(args.reconnect_min_s) if args.agent_retry else None,
        )
        self.connects = args.connects
        self.payload = os.urandom(args.payload)
        self.interval_s = 0.0
        self.devices: list[tuple[Client, bytes]] = []
        for index in range(args.first, args.first + args.count):
            dev = device_id(index)
            will = (health_topic(dev), encode(Health(v=1, online=False, at=0)))
            client = Client(
                device_client_id(dev), dev, device_password(args.secret, dev),
                (names.receipts_topic(dev), names.status_topic(dev)), will,
            )  # fmt: skip
            self.devices.append((client, names.orders_topic(dev).encode()))

    async def connect_all(self, spread_s: float) -> dict[str, Any]:
        """Connect every device; each first waits a uniform draw from ``[0, spread_s]``
        (as the agent does: from ``[0, reconnect_min_s]``)."""
        started = time.monotonic()
        gate = asyncio.Semaphore(self.connects)
        target = self.target
        target.attempts = target.handshakes = target.attempts_failed = 0
        target.errors = {}

        async def one(client: Client) -> None:
            first_s = target.agent[1] if target.agent else spread_s
            await asyncio.sleep(random.uniform(0.0, first_s))
            async with gate:
                await open_client(client, target)

        await asyncio.gather(*(one(client) for client, _ in self.devices))
        return {"seconds": time.monotonic() - started, "failed": target.attempts_failed,
                "attempts": target.attempts, "handshakes": target.handshakes,
                "errors": target.errors}  # fmt: skip

    async def drop_all(self) -> None:
        """Abort every connection and wait until each is gone (a protocol is reused)."""
        for client, _ in self.devices:
            client.dropping = True
            if client.transport is not None:
                client.transport.abort()
        async with asyncio.timeout(30):
            # Each transport's connection_lost, not an event, says when it is gone.
            while any(client.transport is not None for client, _ in self.devices):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def tick(self) -> None:
        """Every second: a tenth (of the interval) publishes, idle devices ping."""
        second = 0
        while True:
            await asyncio.sleep(1.0)
            second += 1
            now = time.monotonic()
            slot = int(self.interval_s) or 1
            for index, (client, topic) in enumerate(self.devices):
                if client.transport is None:
                    continue
                if self.interval_s and index % slot == second % slot:
                    client.write(publish_packet(topic, client.next_packet_id(), self.payload))
                elif now - client.last_write >= KEEPALIVE_S:
                    client.write(PINGREQ)

    def stats(self) -> dict[str, Any]:
        return {
            "acked": sum(c.acked for c, _ in self.devices),
            "connected": sum(c.transport is not None for c, _ in self.devices),
            "lost": sum(c.lost_unexpectedly for c, _ in self.devices),
            "cpu_s": process_cpu_s(os.getpid(), children=False),
        }

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        ticker = asyncio.create_task(self.tick())
        while line := (await reader.readline()).decode().split():
            command, rest = line[0], line[1:]
            reply: dict[str, Any] = {}
            if command == "connect":
                reply = await self.connect_all(float(rest[0]) if rest else 0.0)
            elif command == "drop":
                await self.drop_all()
            elif command == "load":
                self.interval_s = float(rest[0])
            elif command == "stats":
                reply = self.stats()
            print(json.dumps(reply), flush=True)
            if command == "quit":
                break
        ticker.cancel()
        await self.drop_all()


# --- the broker and the measurement ---


def secure_config(directory: Path, port: int) -> str:
    """The committed secure.conf, its paths and port pointed at ``directory``."""
    text = (REPO / "mosquitto/secure.conf").read_text()
    text = text.replace("plugin /usr/lib/mosquitto_dynamic_security.so",
                        f"plugin {find_dynsec_plugin()}")  # fmt: skip
    for mounted in ("/mosquitto/accounts/", "/mosquitto/certs/", "/mosquitto/data/"):
        text = text.replace(mounted, f"{directory}/")
    return text.replace("listener 8883", f"listener {port} 127.0.0.1")


def write_accounts(directory: Path, devices: int, secret: str) -> None:
    accounts = Accounts()
    for service in ("bridge", "pipeline"):
        accounts.set_service(service, device_password(secret, service))
    for index in range(devices):
        dev = device_id(index)
        accounts.set_device(dev, device_password(secret, dev))
    accounts.save(directory / "dynamic-security.json")


def tcp_ext(*counters: str) -> dict[str, int]:
    """TcpExt counters of this network namespace (``nstat -az TcpExt…``), e.g.
    ListenOverflows (SYNs dropped on a full accept queue) and ListenDrops (those and
    every other drop at a listener); every listener's, so other jobs' count too."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names_, values in zip(lines[::2], lines[1::2], strict=True):
        if names_[0] == "TcpExt:":
            return {name: int(values[names_.index(name)]) for name in counters}
    return dict.fromkeys(counters, 0)


def listen_drops() -> dict[str, int]:
    return tcp_ext("ListenOverflows", "ListenDrops")


def run_queue_wait_s(pid: int) -> float:
    """Seconds ``pid``'s thread was runnable but waited for a core (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def start_perf(path: str, pid: int) -> asyncio.subprocess.Process:
    """``perf record`` of ``pid`` (flat profile) into ``path``; stopped with SIGINT."""
    recorder = await asyncio.create_subprocess_exec(
        "perf", "record", "-F", "999", "-p", str(pid), "-o", path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(0.5)  # attached
    return recorder


async def perf_shares(path: str, sort: str, top: int) -> dict[str, float]:
    """The ``top`` rows of ``perf report --sort SORT`` of ``path``: name -> % of samples."""
    report = await asyncio.create_subprocess_exec(
        "perf", "report", "-i", path, "--no-children", "--sort", sort, "--stdio", "-q",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    text, _ = await report.communicate()
    shares: dict[str, float] = {}
    for line in text.decode().splitlines():
        fields = line.split()
        if len(shares) < top and fields and fields[0].endswith("%"):
            name = " ".join(f for f in fields[1:] if f not in ("-", "[.]", "[k]"))
            shares[name] = float(fields[0].rstrip("%"))
    return shares


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def raise_file_limit(devices: int) -> None:
    """Lift the soft file limit for the broker (inherited) to what ``devices`` need."""
    need = devices + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError) as exc:
        raise SystemExit(
            f"the broker needs {need} open files and the hard limit is {hard}: {exc}"
        ) from exc


class Workers:
    """The client processes, each answering one JSON line per command."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    async def ask(self, command: str) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{command}\n".encode())
        replies = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise SystemExit(f"a client process died on {command!r}")
            replies.append(json.loads(line))
        return replies

    async def cpu_s(self) -> float:
        return sum(reply["cpu_s"] for reply in await self.ask("stats"))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    raise_file_limit(args.devices + args.offline)
    directory = Path(tempfile.mkdtemp(prefix="broker-sizing-"))
    secret = secrets.token_hex(8)
    ca = create_ca(directory)
    server = issue_cert(ca, directory, "localhost", server=True)
    server.cert.rename(directory / "server.crt")
    server.key.rename(directory / "server.key")
    started = time.monotonic()
    write_accounts(directory, args.devices + args.offline, secret)
    print(f"{args.devices} accounts written in {time.monotonic() - started:.1f} s", flush=True)
    port = free_port()
    broker = MosquittoProcess(directory / "run", port, config=secure_config(directory, port))
    broker.start_timeout_s = 120.0
    broker.start()
    pid = broker.pid
    assert pid is not None
    out: dict[str, Any] = {"devices": args.devices, "procs": args.procs}
    procs: list[asyncio.subprocess.Process] = []
    services: list[Client] = []
    pinger: asyncio.Task[None] | None = None
    try:
        await asyncio.sleep(1.0)
        out["rss_empty_mib"] = rss_mib(pid)
        target = Target(port, tls_context(ca.cert))
        subscriptions = [("bridge", names.shared_orders_subscription("bridge"))]
        if not args.no_wills:
            subscriptions.append(("pipeline", "$share/pipeline/v1/devices/+/health"))
        for name, topic in subscriptions:
            service = Client(f"{name}-sizing", name, device_password(secret, name), (topic,), None)
            await open_client(service, target)
            services.append(service)
        bridge = services[0]

        async def ping_services() -> None:
            while True:
                await asyncio.sleep(5.0)
                for service in services:
                    if time.monotonic() - service.last_write >= KEEPALIVE_S / 3:
                        service.write(PINGREQ)

        pinger = asyncio.create_task(ping_services())

        async def spawn(first: int, count: int, source_ip: str) -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.broker_sizing", "client", "--port", str(port),
                "--cafile", str(ca.cert), "--secret", secret, "--first", str(first),
                "--count", str(count), "--source-ip", source_ip,
                "--connects", str(args.connects), "--payload", str(args.payload),
                *(["--agent-retry"] if args.agent_retry else []),
                *(["--reconnect-min-s", str(args.reconnect_min_s)] if args.reconnect_min_s else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip

        share = -(-args.devices // args.procs)
        for index in range(args.procs):
            count = min(share, args.devices - index * share)
            procs.append(await spawn(index * share, count, f"127.0.0.{index + 2}"))
        if args.offline:
            # Devices that connected once and went away: their sessions wait in the
            # broker's session expiry list, as an offline device's do for 7 days.
            procs.append(await spawn(args.devices, args.offline, "127.0.0.99"))
            offline = Workers(procs[-1:])
            await offline.ask("connect")
            await offline.ask("drop")
            await offline.ask("quit")
            await procs.pop().wait()
            out["offline_sessions"] = args.offline
        workers = Workers(procs)

        async def window(seconds: float) -> tuple[float, float, float]:
            """(broker CPU s, clients' CPU s, wall s) over ``seconds``."""
            cpu0, clients0, t0 = (
                process_cpu_s(pid, children=False),
                await workers.cpu_s(),
                time.monotonic(),
            )
            await asyncio.sleep(seconds)
            cpu1, clients1 = process_cpu_s(pid, children=False), await workers.cpu_s()
            return cpu1 - cpu0, clients1 - clients0, time.monotonic() - t0

        cpu0, t0 = process_cpu_s(pid, children=False), time.monotonic()
        drops0 = listen_drops()
        replies = await workers.ask("connect")
        for name, value in listen_drops().items():
            out[f"connect_{name}"] = value - drops0[name]
        out["connect_s"] = time.monotonic() - t0
        out["connect_broker_cpu_s"] = process_cpu_s(pid, children=False) - cpu0
        out["connect_failed_attempts"] = sum(r["failed"] for r in replies)
        out["connect_handshakes"] = sum(r["handshakes"] for r in replies)
        await asyncio.sleep(2.0)
        out["rss_connected_mib"] = rss_mib(pid)
        out["kib_per_connection"] = (
            (out["rss_connected_mib"] - out["rss_empty_mib"]) * 1024 / args.devices
        )
        print(f"connected: {json.dumps(out)}", flush=True)

        async def load_phase(out: dict[str, Any]) -> None:
            received0 = bridge.received
            await workers.ask(f"load {args.interval}")
            await asyncio.sleep(args.interval)  # every device's slot came round once
            received1 = bridge.received
            broker_cpu, client_cpu, wall = await window(args.load_s)
            out["load_msgs_per_s"] = (bridge.received - received1) / wall
            out["load_broker_cpu_pct"] = 100 * broker_cpu / wall
            out["load_clients_cpu_pct"] = 100 * client_cpu / wall
            out["load_broker_us_per_msg"] = 1e6 * broker_cpu / max(1, bridge.received - received1)
            await workers.ask("load 0")
            await asyncio.sleep(2.0)
            stats = await workers.ask("stats")
            out["load_published_acked"] = sum(s["acked"] for s in stats)
            out["load_received_by_bridge"] = bridge.received - received0
            out["rss_after_load_mib"] = rss_mib(pid)
            print(f"load: {json.dumps(out)}", flush=True)

        def wills() -> int:
            return sum(service.received for service in services[1:])

        async def storm(out: dict[str, Any]) -> None:
            wills0 = wills()
            cpu0, clients0, t0 = (
                process_cpu_s(pid, children=False),
                await workers.cpu_s(),
                time.monotonic(),
            )
            wait0, drops0 = run_queue_wait_s(pid), listen_drops()
            recorder = await start_perf(args.perf, pid) if args.perf else None
            await workers.ask("drop")
            replies = await workers.ask(f"connect {args.storm_spread_s}")
            out["storm_s"] = time.monotonic() - t0
            out["storm_broker_cpu_s"] = process_cpu_s(pid, children=False) - cpu0
            out["storm_broker_ms_per_device"] = 1e3 * out["storm_broker_cpu_s"] / args.devices
            out["storm_broker_run_queue_wait_s"] = run_queue_wait_s(pid) - wait0
            for name, value in listen_drops().items():
                out[f"storm_{name}"] = value - drops0[name]
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                await recorder.wait()
                out["storm_perf_dso_pct"] = await perf_shares(args.perf, "dso", 6)
                out["storm_perf_symbol_pct"] = await perf_shares(args.perf, "dso,symbol", 6)
            out["storm_clients_cpu_s"] = await workers.cpu_s() - clients0
            out["storm_attempts"] = sum(r["attempts"] for r in replies)
            out["storm_handshakes"] = sum(r["handshakes"] for r in replies)
            out["storm_failed_attempts"] = sum(r["failed"] for r in replies)
            out["storm_errors"] = [r["errors"] for r in replies]
            if len(services) > 1:
                # Wills still arrive after the last SUBACK: wait until none came for
                # WILLS_QUIET_S (at most WILLS_MAX_WAIT_S).
                last_count, last_at = wills(), time.monotonic()
                deadline = last_at + WILLS_MAX_WAIT_S
                while time.monotonic() < deadline and time.monotonic() - last_at < WILLS_QUIET_S:
                    await asyncio.sleep(0.1)
                    if (count := wills()) != last_count:
                        last_count, last_at = count, time.monotonic()
                out["storm_wills_heard"] = last_count - wills0
                out["storm_last_will_after_s"] = services[1].last_receive_at - t0
                out["storm_wills_heard_after_s"] = time.monotonic() - t0
            stats = await workers.ask("stats")
            out["connected_at_end"] = sum(s["connected"] for s in stats)
            out["lost_unexpectedly"] = sum(s["lost"] for s in stats)
            out["services_lost"] = sum(service.lost_unexpectedly for service in services)

        if args.idle_s > 0:
            broker_cpu, client_cpu, wall = await window(args.idle_s)
            out["idle_broker_cpu_pct"] = 100 * broker_cpu / wall
            out["idle_clients_cpu_pct"] = 100 * client_cpu / wall
            print(f"idle: broker {out['idle_broker_cpu_pct']:.1f} % CPU", flush=True)
        if args.load_s > 0:
            await load_phase(out)
        await storm(out)
        out["rss_end_mib"] = rss_mib(pid)
        out["loadavg"] = os.getloadavg()
        with contextlib.suppress(ProcessLookupError):
            await workers.ask("quit")
    finally:
        if pinger is not None:
            pinger.cancel()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for service in services:
            if service.transport is not None:
                service.transport.abort()
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    client = sub.add_parser("client", help="a slice of the fleet (started by the bench)")
    for flag in ("--port", "--first", "--count", "--connects", "--payload"):
        client.add_argument(flag, type=int, required=True)
    for flag in ("--cafile", "--secret"):
        client.add_argument(flag, required=True)
    client.add_argument("--source-ip")
    client.add_argument("--agent-retry", action="store_true")
    client.add_argument("--reconnect-min-s", type=float)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--connects", type=int, default=100,
                        help="TLS connects in flight per client process")  # fmt: skip
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--load-s", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between a device's messages under load")  # fmt: skip
    parser.add_argument("--payload", type=int, default=300, help="bytes per message")
    parser.add_argument("--storm-spread-s", type=float, default=0.0,
                        help="in the storm, each device waits a uniform draw from [0, S] "
                        "before reconnecting (0: all at once; not with --agent-retry)")  # fmt: skip
    parser.add_argument("--agent-retry", action="store_true",
                        help="devices retry as the edge agent does: its connect timeout "
                        "(10 s) and full-jitter backoff (0.5 s doubling to 60 s), instead of "
                        "60 s and a uniform 0.2-1 s); a device's first wait is a uniform "
                        "draw from [0, reconnect_min_s], as the agent's after a lost "
                        "connection")  # fmt: skip
    parser.add_argument("--reconnect-min-s", type=float,
                        help="with --agent-retry: the agent's reconnect_min_s (default its "
                        "own, 0.5 s)")  # fmt: skip
    parser.add_argument("--offline", type=int, default=0,
                        help="devices that connect once and leave before the phases: "
                        "persistent sessions of offline devices")  # fmt: skip
    parser.add_argument("--perf", metavar="FILE",
                        help="perf record the broker during the storm into FILE")  # fmt: skip
    parser.add_argument("--no-wills", action="store_true",
                        help="no pipeline client on the health topics (the Wills)")  # fmt: skip
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, as the services use it

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.mode == "client":
        runner(Slice(args).serve())
        return
    result = runner(measure(args))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
