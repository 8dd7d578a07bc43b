"""The MQTT client's public types: handlers, subscriptions, its error, result codes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import ServiceKitError

TOO_LARGE: Final = -2
"""Future result of a message larger than the broker's Maximum Packet Size."""

Ack = Callable[[], None]
"""Sends the PUBACK of one message (a no-op once its connection is gone)."""

Handler = Callable[[str, bytes, Ack], None]
"""Takes one message (topic, payload, ack); must not block; calls ack later or never."""

PropertyHandler = Callable[[str, bytes, Ack, str | None], None]
"""A :data:`Handler` that also takes the value of one MQTT 5 user property (None: absent)."""


class MqttError(ServiceKitError):
    """The broker refused us, broke the protocol, or went away mid-handshake.

    Hierarchy::

        MqttError        root of the client's errors (a ServiceKitError)
        └── QueueFull    a publish refused: ``max_queued`` messages already wait
    """

    def __init__(self, detail: str, reason: str = "mqtt_error") -> None:
        super().__init__(reason, detail)


class QueueFull(MqttError):
    """A publish was refused because ``max_queued`` messages already wait for the window.

    Nothing already queued is dropped; the caller decides what the refused message costs.
    """

    def __init__(self, topic: str, max_queued: int) -> None:
        super().__init__(f"{max_queued} publishes already queued, refused one to {topic}",
                         "queue_full")  # fmt: skip
        self.topic = topic
        self.max_queued = max_queued


@dataclass(frozen=True, slots=True)
class Subscription:
    """A QoS 1 topic filter and the handler of its messages."""

    topic_filter: str
    handler: Handler


@dataclass(frozen=True, slots=True)
class PropertySubscription:
    """A QoS 1 topic filter whose handler also gets the user property ``user_property``.

    The bridge reads the order's ``traceparent`` this way (servicekit.tracing).
    """

    topic_filter: str
    handler: PropertyHandler
    user_property: str


AnySubscription = Subscription | PropertySubscription


def user_property(properties: list[tuple[str, str]], name: str) -> str | None:
    """The first value of the user property ``name``, or None."""
    for key, value in properties:
        if key == name:
            return value
    return None


def no_ack() -> None:
    """QoS 0 messages have nothing to acknowledge."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+``, ``#``, ``$share/{group}/`` prefix)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    parts = topic.split("/")
    for index, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if index >= len(parts) or (level not in ("+", parts[index])):
            return False
    return len(parts) == len(topic_filter.split("/"))
