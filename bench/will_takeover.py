"""Does Mosquitto publish a device's Will when the device's new connection takes its session over?

Not a test. One Mosquitto (plain MQTT, anonymous) and a watcher subscribed to
the Wills' topics. Two cases, each a device connecting as the bench's devices
do (MQTT 5, clean start off, 7-day session, QoS 1 Will):

- takeover: the device connects again with its client id while its first
  connection is still open, as after a network cut the broker has not noticed;
- reset: the device's connection is aborted (TCP RST), as in the storm of
  ``bench.broker_sizing``.

It prints the Wills the watcher heard in each case within ``--wait-s``.
Mosquitto 2.0.11 (Debian 12): 0 for a takeover, 1 for a reset. So a storm's
Will count falls short of its devices by the devices whose new CONNECT the
broker handled before it noticed their old connection was gone
(docs/explanation/brokers.md, "The Wills").

Run: .venv/bin/python -m bench.will_takeover
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from bench.broker_sizing import Client
from testrig.servers import MosquittoProcess, free_port


async def connect(client: Client, port: int) -> None:
    loop = asyncio.get_running_loop()
    client.ready = loop.create_future()
    await loop.create_connection(lambda: client, "127.0.0.1", port)
    await client.ready


async def measure(wait_s: float) -> dict[str, int]:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="will-takeover-"))
    broker = MosquittoProcess(directory, port, extra_conf="allow_anonymous true\n")
    broker.start()
    heard: dict[str, int] = {}
    try:
        watcher = Client("watcher", "watcher", "-", ("wills/#",), None)
        await connect(watcher, port)
        for case in ("takeover", "reset"):
            device_id = f"device-{case}"
            will = (f"wills/{case}", b"offline")
            first = Client(device_id, device_id, "-", (f"status/{case}",), will)
            await connect(first, port)
            before = watcher.received
            if case == "takeover":
                second = Client(device_id, device_id, "-", (f"status/{case}",), will)
                await connect(second, port)
            else:
                assert first.transport is not None
                first.transport.abort()
            await asyncio.sleep(wait_s)
            heard[case] = watcher.received - before
    finally:
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return heard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait-s", type=float, default=2.0, help="seconds to wait for a Will")
    heard = asyncio.run(measure(parser.parse_args().wait_s))
    for case, count in heard.items():
        print(f"{case}: {count} Will(s) heard")


if __name__ == "__main__":
    main()
