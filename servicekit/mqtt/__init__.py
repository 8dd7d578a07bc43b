"""The cloud side's MQTT 5 client: an asyncio protocol on the Rust ``mqtt5`` codec.

Cloud only (``mqtt5`` is in the ``bridge`` extra); the edge agent never imports
this module. Why not a library: the bridge acks each order after its Redis
write, so every message costs a PUBACK and a receipt. gmqtt and paho write each
packet with its own syscall and run a task or a thread hop per message; here
everything queued in one loop turn leaves in one ``transport.write``
(``bench/mqtt_clients.py`` measures the difference).

What it does:

- CONNECT with our Receive Maximum, Maximum Packet Size and session expiry;
  ``clean_start`` only on the first connection if asked, never on a reconnect.
- SUBSCRIBE to its filters at QoS 1 after every CONNACK. Each incoming QoS 1
  PUBLISH goes to its handler with an ``ack`` callable; the PUBACK leaves when
  the handler's owner calls it, and only on the connection the message came in
  on (packet ids belong to a connection; after a reconnect the broker resends).
- Receive Maximum is enforced here, from the CONNECT on: with that many
  messages handed out and not acked (or while the owner paused reading),
  further PUBLISH packets are parked unhandled and unacked. The socket is
  always read, so PUBACKs, PINGRESPs and every other packet are still handled:
  a handler that acks only after its own publishes are PUBACKed must not wait
  on a socket nobody reads, and keep-alive must find a dead broker while the
  owner is paused. Memory: the Receive Maximum bounds what a compliant broker
  sends; Mosquitto 2.0 sends more than an ack freed, so past
  ``PARKED_MAX_BYTES`` parked our own PUBACKs are held back (a broker that
  gets none sends nothing new) until half of it is left; a broker past our Receive Maximum and
  ``PARKED_DISCONNECT_BYTES`` gets DISCONNECT 0x93 (MQTT 5 §3.3.4), an error
  log and a count. A session backlog that arrives during the handshake is
  held to it too.
- QoS 1 publishing with a future per message (its PUBACK reason code), at most
  the broker's Receive Maximum in flight, a bounded queue behind that (a full
  queue refuses the new message with :class:`QueueFull`, logged and counted;
  nothing queued is dropped), and write-side backpressure: nothing new is
  written while the transport's buffer is above its high-water mark. Unacked
  messages are resent after a reconnect: with the same packet id and DUP when
  the session was present (MQTT 5 §4.4), as new messages when it was not.
  ``publish_many`` queues a batch nobody awaits (the pipeline's statuses) with
  one pump; the common PUBACKs (no properties, 0x00 or 0x10) are read by the
  wire itself rather than the codec: one per status is most of what it reads.
- PINGREQ every half keep-alive; a broker silent for 1.5 keep-alives is
  dropped. DISCONNECT from the broker is logged with its reason and counted; a
  session taken over by another client with our id (0x8E) is an error: two
  replicas configured with one client id.
- A supervisor reconnects with :class:`servicekit.backoff.Backoff`, reset after
  CONNACK+SUBACK, for as long as the broker is down; an unexpected error kills
  it loudly (:class:`servicekit.errors.LoopFailed` out of ``async with``).
- Leaving ``async with`` waits, while connected, up to ``close_grace_s`` for
  queued and unacked publishes to be acknowledged, then sends DISCONNECT.
"""

from ._client import CONNECT_TIMEOUT_S, MqttClient
from ._metrics import MqttMetrics
from ._types import (
    TOO_LARGE,
    Ack,
    AnySubscription,
    Handler,
    MqttError,
    PropertyHandler,
    PropertySubscription,
    QueueFull,
    Subscription,
    topic_matches,
    user_property,
)
from ._wire import PARKED_DISCONNECT_BYTES, PARKED_MAX_BYTES, WRITE_HIGH_WATER

__all__ = [
    "CONNECT_TIMEOUT_S",
    "PARKED_DISCONNECT_BYTES",
    "PARKED_MAX_BYTES",
    "TOO_LARGE",
    "WRITE_HIGH_WATER",
    "Ack",
    "AnySubscription",
    "Handler",
    "MqttClient",
    "MqttError",
    "MqttMetrics",
    "PropertyHandler",
    "PropertySubscription",
    "QueueFull",
    "Subscription",
    "topic_matches",
    "user_property",
]
