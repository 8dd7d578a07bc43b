"""The real-server harness: Mosquitto and Redis really run, and really die when killed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion

from fleet.stack import Stack, StackSettings
from schemas import decode_order, encode
from schemas.names import orders_topic, shard_of, stream_key
from testrig.servers import REDIS_CONF, MosquittoProcess, RedisProcess, port_is_open
from tests.helpers import make_order


def test_an_order_crosses_the_real_broker(mosquitto: MosquittoProcess, device_id: str) -> None:
    """An encoded order published at QoS 1 arrives intact at an MQTT 5 subscriber."""
    received: list[bytes] = []
    got = threading.Event()
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(bytes(msg.payload))
        got.set()

    sub.on_message = on_message
    sub.on_connect = lambda c, *_: c.subscribe(orders_topic(device_id), qos=1)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    try:
        assert subscribed.wait(5)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish(orders_topic(device_id), encode(make_order(device_id)), qos=1).wait_for_publish(
            5
        )
        pub.loop_stop()
        pub.disconnect()
        assert got.wait(5)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert decode_order(received[0], topic_device_id=device_id) == make_order(device_id)


def test_an_order_lands_in_its_real_redis_stream(redis_url: str, device_id: str) -> None:
    """XADD to the device's shard stream and read the same payload back."""
    payload = encode(make_order(device_id))
    key = stream_key(shard_of(device_id, 16))
    with redis.Redis.from_url(redis_url) as client:
        client.xadd(key, {"order_id": "01TESTORDER0001", "payload": payload})
        [(_, fields)] = client.xrange(key)
    assert fields[b"payload"] == payload


def test_kill_and_restart_really_happen(
    mosquitto_factory: Callable[..., MosquittoProcess],
    redis_factory: Callable[..., RedisProcess],
) -> None:
    """After kill() the port is closed; restart() brings the server back on the same port."""
    for server in (mosquitto_factory(), redis_factory()):
        port, pid = server.port, server.pid
        assert port_is_open(port)
        server.kill()
        assert not server.running
        assert not port_is_open(port)
        server.start()
        assert server.port == port
        assert server.pid != pid
        assert port_is_open(port)


def test_redis_with_appendonly_keeps_data_across_sigkill(
    redis_factory: Callable[..., RedisProcess],
) -> None:
    """The harness can run a durable Redis: data written before SIGKILL is there after."""
    server = redis_factory(appendonly=True, extra_args=("--appendfsync", "always"))
    with redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
    server.kill()
    server.start()
    with redis.Redis.from_url(server.url) as client:
        assert client.get("k") == b"v"


def test_mosquitto_persistence_file_is_really_written(
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """With persistence on, the broker can write its store in our directory (no silent EACCES)."""
    server = mosquitto_factory(persistence=True)
    server.stop()
    assert (server.workdir / "mosquitto.db").exists(), server.log_tail()


def test_production_redis_runs_the_shipped_config(tmp_path: Path) -> None:
    """RedisProcess.production loads redis/redis.conf; per-run overrides win over the file."""
    with (
        RedisProcess.production(tmp_path / "redis", maxmemory="64mb") as server,
        redis.Redis.from_url(server.url, decode_responses=True) as client,
    ):
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["maxmemory"] == str(64 * 1024 * 1024)
        assert config["save"] == ""
        assert config["dir"] == str(tmp_path / "redis")
        assert client.info("persistence")["aof_enabled"] == 1
    assert "appendfsync always" in REDIS_CONF.read_text().splitlines()


def test_stack_redis_is_the_production_one(tmp_path: Path) -> None:
    """fleet-sim's stack (make stack, make demo) starts Redis from redis/redis.conf."""
    stack = Stack(tmp_path, StackSettings(redis_maxmemory="128mb"))
    assert stack.redis.conf == REDIS_CONF
    assert stack.redis.maxmemory == "128mb"
