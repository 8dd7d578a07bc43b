"""A pipeline worker's status publishing cost: MqttStatusPublisher.send against Mosquitto.

Not a test. Statuses go out in batches of ``--batch`` (the worker's batch) to
devices nobody subscribed for (PUBACK 0x10), and each batch waits for its
PUBACKs before the next, so every status costs its PUBLISH out and its PUBACK
in. Printed per status: the process's CPU (send, loop, reads, writes,
syscalls) and, apart, the CPU spent inside ``send`` itself.

Run: .venv/bin/python -m bench.status_send [--statuses 100000] [--batch 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from pipeline.status import MqttStatusPublisher
from schemas import Status
from servicekit.mqtt import MqttClient
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess

AT_MS = 1_700_000_000_000


def _batches(statuses: int, batch: int) -> list[list[tuple[str, Status]]]:
    def status(n: int) -> Status:
        return Status(v=1, order_id=f"o-{n:016d}", status="fulfilled", reason=None, at=AT_MS + n)

    return [
        [(f"dev-{(start + i) % 10_000:05d}", status(start + i)) for i in range(batch)]
        for start in range(0, statuses, batch)
    ]


async def measure(url: str, statuses: int, batch: int) -> tuple[float, float]:
    """CPU µs per status: the whole process's, and inside ``send``."""
    client = MqttClient(MqttUrl.parse(url), client_id="bench-status-send", clean_start=True,
                        session_expiry_s=0, max_queued=1_000_000, name="bench")  # fmt: skip
    publisher = MqttStatusPublisher(client, backlog_max=1_000_000)
    in_send = 0.0

    async def send_all(batches: list[list[tuple[str, Status]]]) -> None:
        nonlocal in_send
        for messages in batches:
            started = time.thread_time()
            publisher.send(messages)
            in_send += time.thread_time() - started
            await client._sender.idle.wait()  # every PUBACK in, without polling

    async with client:
        await client.wait_connected()
        await send_all(_batches(batch * 20, batch))  # warm up
        in_send = 0.0
        batches = _batches(statuses, batch)
        started = time.process_time()
        await send_all(batches)
        cpu = time.process_time() - started
    return cpu / statuses * 1e6, in_send / statuses * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statuses", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp) / "mosquitto") as broker:
        print(f"{args.statuses:,} statuses in batches of {args.batch}, PUBACKs awaited per batch")
        print(f"{'run':<5}{'process µs/status':>19}{'in send µs/status':>19}")
        for run in range(1, args.runs + 1):
            total, in_send = asyncio.run(measure(broker.url, args.statuses, args.batch))
            print(f"{run:<5}{total:>19.2f}{in_send:>19.2f}", flush=True)


if __name__ == "__main__":
    main()
