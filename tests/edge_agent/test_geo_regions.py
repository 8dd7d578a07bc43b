"""Geo mode units: region parsing, the failover/failback decisions, config refusals, the CLI."""

from __future__ import annotations

import pytest

from edge_agent import AgentConfig, EdgeAgent
from edge_agent.cli import main
from edge_agent.errors import InvalidOrder
from edge_agent.regions import Region, RegionSelector, parse_regions, with_attempt
from schemas import MAX_ORDER_BYTES, encode, names
from schemas.messages import MAX_ATTEMPTS
from servicekit.config import load_config
from servicekit.errors import ConfigError
from servicekit.urls import MqttUrl

from .conftest import order_body


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def regions(*names_: str) -> tuple[Region, ...]:
    return tuple(
        Region(n, (MqttUrl.parse(f"mqtt://127.0.0.1:{1000 + i}"),)) for i, n in enumerate(names_)
    )


def test_parse_regions_forms() -> None:
    from_flags = parse_regions(("eu-1=mqtt://a:1883", "us-2=mqtts://u:p@b:8883"))
    from_env = parse_regions(" eu-1=mqtt://a:1883 , us-2=mqtts://u:p@b:8883 ")
    assert from_flags == from_env
    assert [r.name for r in from_flags] == ["eu-1", "us-2"]
    assert from_flags[1].url.tls
    assert from_flags[1].url.password == "p"
    assert parse_regions(()) == () == parse_regions("")


@pytest.mark.parametrize(
    "spec",
    [
        ("eu=mqtt://a:1", "us=mqtt://c:1", "eu=mqtt://b:1"),  # a region's brokers apart
        ("eu=mqtt://a:1", "eu=mqtt://a:1"),  # a broker twice
        ("EU=mqtt://a:1",),  # upper case
        ("eu\n=mqtt://a:1",),  # a newline must not pass the name check
        ("x" * 33 + "=mqtt://a:1",),
        ("mqtt://a:1",),  # no name
        ("eu=http://a:1",),  # not an MQTT URL
        tuple(f"r{i}=mqtt://a:{i + 1}" for i in range(MAX_ATTEMPTS + 1)),
    ],
)
def test_parse_regions_refuses(spec: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        parse_regions(spec)


def test_with_attempt_appends_once() -> None:
    assert with_attempt("", "a") == ("a",)
    assert with_attempt("a", "b") == ("a", "b")
    assert with_attempt("a,b", "a") == ("a", "b")
    assert with_attempt("ab", "a") == ("ab", "a")  # names, not substrings


def test_failover_after_time_without_connection_then_wraps_home() -> None:
    t = FakeTime()
    sel = RegionSelector(regions("home", "b", "c"), failover_after_s=5, monotonic=t)
    assert not sel.should_fail_over()
    t.now += 4.9
    assert not sel.should_fail_over()
    assert sel.seconds_until_failover() == pytest.approx(0.1)
    t.now += 0.1
    assert sel.should_fail_over()
    assert sel.fail_over().name == "b"
    assert not sel.should_fail_over()  # the clock restarts for b
    t.now += 5
    assert sel.fail_over().name == "c"
    t.now += 5
    assert sel.fail_over().name == "home"
    assert sel.failovers == 3


def test_failover_when_connected_only_with_unanswered_orders() -> None:
    t = FakeTime()
    sel = RegionSelector(regions("home", "b"), failover_after_s=5, monotonic=t)
    sel.on_connected()
    t.now += 60
    assert not sel.should_fail_over()  # idle: nothing to lose, no reason to move
    sel.on_sent()
    t.now += 4
    sel.on_answer(still_inflight=3)  # progress restarts the clock
    t.now += 4
    assert not sel.should_fail_over()
    t.now += 1
    assert sel.should_fail_over()
    sel.on_answer(still_inflight=0)
    assert not sel.should_fail_over()
    assert sel.seconds_until_failover() == float("inf")


def test_lost_connection_starts_the_clock_once() -> None:
    t = FakeTime()
    sel = RegionSelector(regions("home", "b"), failover_after_s=5, monotonic=t)
    sel.on_connected()
    t.now += 10
    sel.on_disconnected()
    t.now += 3
    sel.on_disconnected()  # failed reconnects do not restart it
    t.now += 2
    assert sel.should_fail_over()


def test_failback_only_after_a_good_probe_while_away() -> None:
    t = FakeTime()
    sel = RegionSelector(regions("home", "b"), failover_after_s=5, monotonic=t)
    sel.on_home_probe_ok()
    assert not sel.should_fail_back()  # at home already
    t.now += 5
    sel.fail_over()
    sel.on_connected()
    assert not sel.should_fail_back()
    sel.on_home_probe_ok()
    assert sel.should_fail_back()
    assert sel.fail_back() is sel.home
    assert sel.at_home
    assert not sel.should_fail_back()
    assert (sel.failovers, sel.failbacks) == (1, 1)


def test_one_region_never_switches() -> None:
    t = FakeTime()
    sel = RegionSelector(regions("home"), failover_after_s=1, monotonic=t)
    t.now += 100
    assert not sel.should_fail_over()


def test_config_from_toml_list_and_env(tmp_path: object) -> None:
    config = load_config(
        AgentConfig,
        env={"ORDERS_DEVICE_ID": "d1", "ORDERS_REGION": "home=mqtt://a:1883,b=mqtt://b:1883"},
    )
    assert [r.name for r in config.regions] == ["home", "b"]
    config.validate()


def test_config_refuses_a_retry_horizon_past_the_marker_ttl() -> None:
    with pytest.raises(ConfigError) as err:
        AgentConfig(device_id="d1", resend_max_age_s=float(names.DEDUP_TTL_S)).validate()
    assert err.value.reason == "retry_horizon_too_long"
    AgentConfig(device_id="d1").validate()  # the default is below it


def test_cli_refuses_bad_regions_and_horizon(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device-id", "d1", "--region", "Home=mqtt://a:1"]) == 2
    assert "region name" in capsys.readouterr().err
    ttl = str(names.DEDUP_TTL_S + 1)
    assert main(["--device-id", "d1", "--resend-max-age-s", ttl]) == 2
    assert "dedup marker TTL" in capsys.readouterr().err


def test_intake_refuses_an_order_that_would_not_fit_with_its_attempts() -> None:
    """Geo: an order must fit the 16 KiB cap with every region named, or it could never be sent."""
    single = EdgeAgent(AgentConfig(device_id="d1", db=":memory:"), inline_storage=True)
    geo = EdgeAgent(
        AgentConfig(
            device_id="d1", db=":memory:", region=("home=mqtt://a:1", "b-region=mqtt://b:1")
        ),
        inline_storage=True,
    )
    body = order_body("geo-size-1")
    base = len(encode(single.validate({**body, "attrs": {"pad": ""}})))
    body["attrs"] = {"pad": "x" * (MAX_ORDER_BYTES - base - 2)}
    assert len(encode(single.validate(body))) <= MAX_ORDER_BYTES  # fits without attempts
    with pytest.raises(InvalidOrder) as err:
        geo.validate(body)
    assert err.value.reason == "too_large"


def test_failback_holdoff_doubles_while_home_does_not_answer() -> None:
    """Home's broker answers probes but its bridge is dead: each failback waits twice as long."""
    t = FakeTime()
    sel = RegionSelector(
        regions("home", "b"), failover_after_s=5, monotonic=t, failback_holdoff_s=30
    )
    waits = []
    for _ in range(3):
        sel.on_connected()  # at home
        sel.on_sent()
        t.now += 5
        assert sel.should_fail_over()
        sel.fail_over()
        sel.on_connected()  # in b
        sel.on_home_probe_ok()
        waits.append(sel.failback_wait_s())
        assert not sel.should_fail_back()
        t.now += sel.failback_wait_s()
        sel.on_home_probe_ok()
        assert sel.should_fail_back()
        sel.fail_back()
    assert waits == [30, 60, 120]
    sel.on_connected()
    sel.on_sent()
    sel.on_answer(still_inflight=0)  # home answers again: the hold-off is forgotten
    sel.on_sent()
    t.now += 5
    sel.fail_over()
    assert sel.failback_wait_s() == 30


def test_leaving_home_for_no_connection_has_no_holdoff() -> None:
    t = FakeTime()
    sel = RegionSelector(
        regions("home", "b"), failover_after_s=5, monotonic=t, failback_holdoff_s=30
    )
    t.now += 5
    sel.fail_over()
    sel.on_home_probe_ok()
    assert sel.should_fail_back()
