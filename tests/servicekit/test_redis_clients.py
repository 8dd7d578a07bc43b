"""servicekit.redis_clients: the Sentinel settings every service shares, checked at start."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool

from bridge.config import BridgeConfig
from pipeline.config import PipelineConfig
from servicekit.config import ConfigError, load_config
from servicekit.redis_clients import check_sentinel_settings, connect, sentinel_address


@pytest.mark.parametrize(
    ("entry", "address"),
    [("127.0.0.1:26379", ("127.0.0.1", 26379)), ("sentinel-a:1", ("sentinel-a", 1)),
     ("[::1]:26379", ("::1", 26379))],
)  # fmt: skip
def test_sentinel_address_parses_host_and_port(entry: str, address: tuple[str, int]) -> None:
    assert sentinel_address(entry) == address


@pytest.mark.parametrize("entry", ["host", "host:", ":26379", "host:0", "host:70000", "a b:1"])
def test_sentinel_address_refuses_what_is_not_host_port(entry: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        sentinel_address(entry)


def test_sentinel_settings_go_together_and_not_with_a_cluster() -> None:
    check_sentinel_settings(["h:1"], "orders", cluster=False)
    check_sentinel_settings([], "", cluster=True)
    with pytest.raises(ValueError, match="give both"):
        check_sentinel_settings(["h:1"], "", cluster=False)
    with pytest.raises(ValueError, match="give both"):
        check_sentinel_settings([], "orders", cluster=False)
    with pytest.raises(ValueError, match="not with redis_cluster"):
        check_sentinel_settings(["h:1"], "orders", cluster=True)


@pytest.mark.parametrize("cls", [BridgeConfig, PipelineConfig])
def test_services_refuse_a_sentinel_without_its_master_name(
    cls: type[BridgeConfig] | type[PipelineConfig],
) -> None:
    env = {"ORDERS_REDIS_SENTINEL": "127.0.0.1:26379,127.0.0.1:26380"}
    with pytest.raises(ConfigError, match="give both"):
        load_config(cls, env=env)
    config = load_config(cls, env={**env, "ORDERS_REDIS_SENTINEL_MASTER": "orders"})
    assert config.redis_sentinel == ("127.0.0.1:26379", "127.0.0.1:26380")


async def test_a_sentinel_client_takes_credentials_from_the_url_not_its_host() -> None:
    client = connect(
        "redis://bridge:pw@ignored.invalid:1/3",
        timeout_s=1.0,
        sentinels=["127.0.0.1:26379"],
        sentinel_master="orders",
    )
    try:
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("bridge", "pw", 3)
        assert "host" not in kwargs
    finally:
        await client.aclose()  # closes the Sentinels' clients too (none connected here)
