"""Geo mode (GEO.md): the agent's regions, which one it uses, when it fails over and back.

The agent knows an ordered list of regions, home first, each a name and an
ordered list of brokers (``--region NAME=MQTT_URL``, repeatable; the same NAME
again adds a broker to that region). It is connected to one broker at a time.
:class:`RegionSelector` is the decision logic only (no I/O, injected clock),
so it is tested on its own; the publisher drives it, in single-region mode too
(one unnamed region: the brokers of ``--mqtt-url a,b``):

* **Failover** after ``failover_after_s`` without a connection to the current
  broker: to the next broker of the same region; once every broker of the
  region failed, to the next region in the list (its first broker), wrapping
  to home. Connected with orders in flight and no answer (receipt of any
  result, or a PUBACK refusal) for that long: to the next region (a region's
  brokers share its bridges; with one region the agent stays).
* **Failback** to home: while on another region, the agent probes home's brokers
  (in order, until one answers) every ``failback_probe_s`` with a throw-away CONNECT (client id
  ``{client_id}-probe``, no session, no subscriptions, so it can never take a
  message meant for the agent's own session) and moves home at the first probe
  that gets a CONNACK. A CONNACK does not prove home's bridge works: each time
  the agent leaves home because its orders got no answer there, the next
  failback waits twice as long (``failback_probe_s`` × 2^(n-1), at most an
  hour), until an answer at home resets it. So a home broker up without a
  working bridge costs a flap at 30 s, 60 s, 120 s… rather than every 30 s.

An order's ``attempts`` (the regions it was published to, first = authority)
is kept by the outbox (column ``regions``) and grows only when the region
changes, so resends to the same region carry the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from schemas import decode_order, encode
from schemas.ids import is_region_name
from schemas.messages import MAX_ATTEMPTS
from servicekit.errors import ConfigError
from servicekit.urls import MqttUrl, redact

MAX_FAILBACK_HOLDOFF_S: Final = 3600.0


@dataclass(frozen=True)
class Region:
    """One region the agent may publish to: its name (as ``attempts`` carries it) and brokers.

    ``urls`` is the order the agent tries the region's brokers in; ``url`` the first.
    """

    name: str
    urls: tuple[MqttUrl, ...]

    @property
    def url(self) -> MqttUrl:
        return self.urls[0]


def parse_regions(spec: str | tuple[str, ...]) -> tuple[Region, ...]:
    """Parse ``NAME=MQTT_URL`` entries, home first; a name given again adds a broker.

    ``spec`` is a tuple of entries (repeated ``--region`` flags, a TOML list)
    or one string of comma-separated entries (the ``ORDERS_REGION`` variable).
    The entries of one region must be next to each other, in the order its
    brokers are tried. An empty spec means single-region mode: ``()``.

    Raises:
        ConfigError: a malformed entry, a bad name or URL, a region's entries
            apart, a broker given twice, or more regions than an order's
            ``attempts`` can hold.
    """
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    entries = [entry.strip() for entry in entries if entry.strip()]
    regions: list[Region] = []
    for entry in entries:
        name, sep, url = entry.partition("=")
        if not sep:
            raise ConfigError(f"region {redact(entry)!r} is not NAME=MQTT_URL", "invalid_region")
        if not is_region_name(name):
            raise ConfigError(
                f"region name {name!r} must be 1-32 chars of [a-z0-9-]", "invalid_region"
            )
        broker = MqttUrl.parse(url.strip())
        if regions and regions[-1].name == name:
            last = regions[-1]
            if broker in last.urls:
                raise ConfigError(f"region {name!r} lists a broker twice", "invalid_region")
            regions[-1] = Region(name, (*last.urls, broker))
            continue
        if any(region.name == name for region in regions):
            raise ConfigError(
                f"region {name!r} is given twice, apart: list its brokers one after the other",
                "invalid_region",
            )
        regions.append(Region(name, (broker,)))
    if len(regions) > MAX_ATTEMPTS:
        raise ConfigError(
            f"{len(regions)} regions; an order's attempts hold at most {MAX_ATTEMPTS}",
            "invalid_region",
        )
    return tuple(regions)


def spread(regions: tuple[Region, ...], device_id: str) -> tuple[Region, ...]:
    """Each region's brokers in the device's own order (``broker_order=hashed``).

    Rendezvous hashing: the brokers sorted by a hash (BLAKE2b) of the device id and the
    broker's address. One fleet-wide list then spreads devices evenly over a
    region's brokers, and the devices of a lost broker spread evenly over the
    others (rotating the list sent them all to the next one, which then held
    twice its share). A broker added or removed moves only its own share, and
    each device still tries every broker.
    """
    return tuple(
        Region(r.name, tuple(sorted(r.urls, key=lambda url: _weight(device_id, url))))
        for r in regions
    )


def _weight(device_id: str, url: MqttUrl) -> bytes:
    # Not CRC-32: it is linear, and similar ids and addresses got correlated weights.
    return hashlib.blake2b(f"{device_id} {url.host}:{url.port}".encode(), digest_size=8).digest()


class RegionSelector:
    """Which region to use now; failover and failback decisions. Not thread-safe, no I/O.

    Times are seconds of ``monotonic`` (the agent clock's monotonic reading).
    """

    def __init__(
        self,
        regions: tuple[Region, ...],
        *,
        failover_after_s: float,
        monotonic: Callable[[], float],
        failback_holdoff_s: float = 0.0,
    ) -> None:
        if not regions:
            raise ValueError("geo mode needs at least one region")
        self.regions = regions
        self.failover_after_s = failover_after_s
        self._monotonic = monotonic
        self._index = 0
        self._broker = 0  # index in the current region's urls
        self._brokers = sum(len(region.urls) for region in regions)
        self._home_broker = 0  # the home broker whose probe answered
        self.failovers = 0  # region changes
        self.broker_switches = 0  # moves to another broker of the same region
        self.failbacks = 0
        self.connected = False
        self._unconnected_since: float | None = monotonic()
        self._unanswered_since: float | None = None
        self._home_healthy = False
        self.failback_holdoff_s = failback_holdoff_s
        self._home_stalls = 0  # times we left home for lack of answers, since its last answer
        self._failback_not_before = 0.0

    @property
    def home(self) -> Region:
        return self.regions[0]

    @property
    def current(self) -> Region:
        return self.regions[self._index]

    @property
    def current_url(self) -> MqttUrl:
        """The broker in use."""
        return self.current.urls[self._broker]

    @property
    def position(self) -> tuple[int, int]:
        """The indexes of the region and of its broker in use (changes at every switch)."""
        return self._index, self._broker

    @property
    def at_home(self) -> bool:
        return self._index == 0

    # --- what the publisher reports ------------------------------------------

    def on_connected(self) -> None:
        self.connected = True
        self._unconnected_since = None
        self._unanswered_since = None
        if self.at_home:
            self._home_healthy = False

    def on_disconnected(self) -> None:
        """The connection ended (lost, or we left): the no-connection clock starts."""
        if self.connected or self._unconnected_since is None:
            self._unconnected_since = self._monotonic()
        self.connected = False
        self._unanswered_since = None

    def on_sent(self) -> None:
        if self._unanswered_since is None:
            self._unanswered_since = self._monotonic()

    def on_answer(self, still_inflight: int) -> None:
        """A receipt (any result) or a PUBACK refusal: the region is alive."""
        self._unanswered_since = self._monotonic() if still_inflight else None
        if self.at_home:
            self._home_stalls = 0

    def on_home_probe_ok(self, broker: int = 0) -> None:
        """A probe of home's broker ``broker`` (index in its urls) got a CONNACK."""
        if not self.at_home:
            self._home_healthy = True
            self._home_broker = broker

    # --- decisions -------------------------------------------------------------

    def should_fail_over(self) -> bool:
        """Failover due: too long without a connection, or without an answer while waiting."""
        return self._brokers > 1 and self.seconds_until_failover() <= 0.0

    def should_fail_back(self) -> bool:
        return self._home_healthy and not self.at_home and self.failback_wait_s() <= 0.0

    def failback_wait_s(self) -> float:
        """How long a good probe of home must still wait to count (stall hold-off)."""
        return max(0.0, self._failback_not_before - self._monotonic())

    def seconds_until_failover(self) -> float:
        """How long until :meth:`should_fail_over` turns true by time alone (inf: never).

        Without a connection any other broker helps. Connected without answers, only
        another region does: a region's brokers share its bridges, so a missing answer
        says nothing about the broker (and moving would only add resends to the load).
        """
        if self.connected:
            since, alternatives = self._unanswered_since, len(self.regions) - 1
        else:
            since, alternatives = self._unconnected_since, self._brokers - 1
        if since is None or not alternatives:
            return float("inf")
        return max(0.0, since + self.failover_after_s - self._monotonic())

    def fail_over(self) -> Region:
        """Move to the current region's next broker, else to the next region; return the region.

        Without a connection, each region's brokers are tried in order before the
        next region (wrapping to home; a single region wraps to its first broker).
        Connected without answers, the move is to the next region.
        """
        if not self.connected and self._broker + 1 < len(self.current.urls):
            self._broker += 1
            self.broker_switches += 1
            self._reset_for_switch()
            return self.current
        if len(self.regions) == 1:
            self._broker = 0
            self.broker_switches += 1
            self._reset_for_switch()
            return self.current
        if self.at_home and self.connected:  # connected, yet leaving: home did not answer
            self._home_stalls += 1
            holdoff = self.failback_holdoff_s * 2.0 ** min(self._home_stalls - 1, 16)
            self._failback_not_before = self._monotonic() + min(holdoff, MAX_FAILBACK_HOLDOFF_S)
        self._index = (self._index + 1) % len(self.regions)
        self._broker = 0
        self.failovers += 1
        self._reset_for_switch()
        return self.current

    def fail_back(self) -> Region:
        """Move home, to the broker whose probe answered; return home."""
        self._index = 0
        self._broker = self._home_broker
        self.failbacks += 1
        self._reset_for_switch()
        return self.current

    def _reset_for_switch(self) -> None:
        self.connected = False
        self._unconnected_since = self._monotonic()
        self._unanswered_since = None
        self._home_healthy = False


def with_attempt(regions: str, name: str) -> tuple[str, ...]:
    """The stored comma-separated ``regions`` as a tuple, with ``name`` appended if new."""
    names = tuple(regions.split(",")) if regions else ()
    return names if name in names else (*names, name)


def with_attempts(payload: bytes, attempts: tuple[str, ...]) -> bytes:
    """The stored Order ``payload`` re-encoded with geo ``attempts`` (deterministic bytes).

    Raises:
        SchemaError: ``too_large`` if the attempts push it past the order size cap.
    """
    order = decode_order(payload)
    return encode(msgspec.structs.replace(order, attempts=attempts))
