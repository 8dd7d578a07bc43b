"""Several brokers per region: parsing, spreading, and the failover order (no I/O)."""

from __future__ import annotations

import collections

import pytest

from edge_agent import AgentConfig
from edge_agent.regions import Region, RegionSelector, parse_regions, spread
from servicekit.credentials import url_has_password, urls_with_password
from servicekit.errors import ConfigError
from servicekit.urls import MqttUrl, parse_mqtt_urls


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_region_named_again_adds_brokers_in_order() -> None:
    from_flags = parse_regions(
        ("home=mqtt://a:1883", "home=mqtt://b:1883", "eu=mqtt://c:1883", "eu=mqtt://d:1883")
    )
    assert from_flags == parse_regions("home=mqtt://a:1883,home=mqtt://b:1883,"
                                       "eu=mqtt://c:1883,eu=mqtt://d:1883")  # fmt: skip
    assert [(r.name, [u.host for u in r.urls]) for r in from_flags] == [
        ("home", ["a", "b"]),
        ("eu", ["c", "d"]),
    ]
    assert from_flags[0].url.host == "a"


def test_single_url_configs_keep_their_meaning() -> None:
    (region,) = parse_regions(("home=mqtt://a:1883",))
    assert region.urls == (MqttUrl.parse("mqtt://a:1883"),)
    assert parse_mqtt_urls("mqtt://a:1883") == (MqttUrl.parse("mqtt://a:1883"),)
    assert [u.port for u in parse_mqtt_urls(" mqtt://a:1 , mqtts://b ")] == [1, 8883]
    with pytest.raises(ConfigError):
        parse_mqtt_urls("mqtt://a:1,mqtt://a:1")
    with pytest.raises(ConfigError):
        parse_mqtt_urls(" , ")


def test_every_broker_of_home_before_the_next_region_then_wrap() -> None:
    t = FakeTime()
    regions = parse_regions(("home=mqtt://a", "home=mqtt://b", "eu=mqtt://c", "eu=mqtt://d"))
    sel = RegionSelector(regions, failover_after_s=5, monotonic=t)
    visited = [sel.current_url.host]
    for _ in range(4):
        t.now += 5
        assert sel.should_fail_over()
        sel.fail_over()
        visited.append(sel.current_url.host)
    assert visited == ["a", "b", "c", "d", "a"]
    assert (sel.broker_switches, sel.failovers) == (2, 2)


def test_no_answers_move_to_the_next_region_not_the_next_broker() -> None:
    """A region's brokers share its bridges: connected without answers, the agent tries
    another region (geo), and with a single region it stays."""
    t = FakeTime()
    geo = RegionSelector(parse_regions(("home=mqtt://a", "home=mqtt://b", "eu=mqtt://c")),
                         failover_after_s=5, monotonic=t, failback_holdoff_s=30)  # fmt: skip
    single = RegionSelector((Region("", parse_mqtt_urls("mqtt://a,mqtt://b")),),
                            failover_after_s=5, monotonic=t)  # fmt: skip
    for sel in (geo, single):
        sel.on_connected()
        sel.on_sent()
    t.now += 4
    assert not geo.should_fail_over()
    t.now += 1
    assert geo.should_fail_over()
    assert geo.fail_over().name == "eu"
    assert geo.failback_wait_s() > 0  # leaving home unanswered holds failback off
    t.now += 1000
    assert not single.should_fail_over()
    assert single.seconds_until_failover() == float("inf")
    single.on_disconnected()  # the connection itself goes: now the other broker helps
    t.now += 5
    assert single.should_fail_over()
    single.fail_over()
    assert single.current_url.host == "b"


def test_single_region_brokers_wrap_and_a_lone_broker_never_fails_over() -> None:
    t = FakeTime()
    single = (Region("", parse_mqtt_urls("mqtt://a,mqtt://b")),)
    sel = RegionSelector(single, failover_after_s=5, monotonic=t)
    t.now += 5
    sel.fail_over()
    t.now += 5
    sel.fail_over()
    assert sel.current_url.host == "a"
    assert sel.broker_switches == 2
    lone = RegionSelector((Region("", parse_mqtt_urls("mqtt://a")),), failover_after_s=5,
                          monotonic=t)  # fmt: skip
    t.now += 1000
    assert not lone.should_fail_over()
    assert lone.seconds_until_failover() == float("inf")


def test_failback_goes_to_the_home_broker_whose_probe_answered() -> None:
    t = FakeTime()
    regions = parse_regions(("home=mqtt://a", "home=mqtt://b", "eu=mqtt://c"))
    sel = RegionSelector(regions, failover_after_s=5, monotonic=t)
    for _ in range(2):
        t.now += 5
        sel.fail_over()
    assert sel.current.name == "eu"
    sel.on_home_probe_ok(1)
    assert sel.should_fail_back()
    sel.fail_back()
    assert (sel.current.name, sel.current_url.host) == ("home", "b")


def test_hashed_order_spreads_a_fleet_evenly_and_keeps_every_broker() -> None:
    (region,) = parse_regions(("home=mqtt://a", "home=mqtt://b", "home=mqtt://c"))
    firsts = collections.Counter(spread((region,), f"dev-{i}")[0].url.host for i in range(3000))
    assert set(firsts) == {"a", "b", "c"}
    assert min(firsts.values()) > 800  # 1000 each, give or take
    ordered = spread((region,), "dev-7")[0]
    assert sorted(u.host for u in ordered.urls) == ["a", "b", "c"]
    assert spread((region,), "dev-7") == spread((region,), "dev-7")  # stable


def test_hashed_order_spreads_a_lost_brokers_devices_over_all_the_others() -> None:
    """With a rotated list every device of a lost broker went to the same next broker."""
    (region,) = parse_regions(tuple(f"home=mqtt://{host}" for host in "abcd"))
    orders = [spread((region,), f"dev-{i}")[0].urls for i in range(4000)]
    moved = collections.Counter(urls[1].host for urls in orders if urls[0].host == "a")
    assert set(moved) == {"b", "c", "d"}
    assert min(moved.values()) > 0.8 * sum(moved.values()) / 3


def test_config_refuses_a_bad_broker_list() -> None:
    with pytest.raises(ConfigError):
        AgentConfig(device_id="dev-1", mqtt_url="mqtt://a,mqtt://a").validate()
    AgentConfig(device_id="dev-1", mqtt_url="mqtt://a,mqtt://b").validate()


def test_a_password_in_any_url_of_a_broker_list_counts_as_one() -> None:
    assert url_has_password("mqtt://a:1,mqtts://u:p@b:8883")
    assert not url_has_password("mqtt://u@a:1,mqtt://u@b:1")
    assert urls_with_password("mqtt://u@a:1, mqtt://u@b:1", "s,3", "mqtt_url") == (
        "mqtt://u:s%2C3@a:1,mqtt://u:s%2C3@b:1"
    )
    with pytest.raises(ConfigError):
        urls_with_password("mqtt://a:1,mqtt://u:p@b:1", "s", "mqtt_url")
