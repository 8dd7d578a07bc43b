"""What a PUBACK reason code means for the order (MQTT 5.0, section 3.4.2.1).

A code below 0x80 is success, except that 0x10 (no matching subscribers)
says the broker dropped the order: no bridge was subscribed. Of the error
codes, some say "not now" and some say "not ever, as things are configured":

* **transient** (0x10 no matching subscribers, 0x80 unspecified, 0x83
  implementation specific, 0x91 packet identifier in use, 0x97 quota
  exceeded, and any code this table does not know): send again after a
  backoff that grows with the order's sends; the order stays due.
* **definitive** (0x87 not authorized, 0x90 topic name invalid, 0x95 packet
  too large, 0x99 payload format invalid): sending the same bytes to the same
  topic fails until someone changes the broker's ACL, limits or our
  configuration. The order becomes ``held``: kept, alarmed, never pruned,
  until ``edge-agent retry`` re-queues it.

An unknown code counts as transient: retrying with capped backoff costs a
little traffic, holding would stop an order that might pass.
"""

from __future__ import annotations

from enum import Enum
from typing import Final


class PubackAction(Enum):
    """What the publisher does with an order after its PUBACK."""

    DELIVERED = "delivered"  # wait for the receipt, as always
    RETRY = "retry"
    HOLD = "hold"


# A success code that means "dropped": no bridge subscribed (a broker restarted
# without persistence, before the bridge is back; Mosquitto answers 0 when a
# shared subscription matches). Resending after a short backoff beats waiting
# out the receipt timeout.
NO_MATCHING_SUBSCRIBERS: Final = 0x10
TRANSIENT_CODES: Final = frozenset({NO_MATCHING_SUBSCRIBERS, 0x80, 0x83, 0x91, 0x97})
DEFINITIVE_CODES: Final = frozenset({0x87, 0x90, 0x95, 0x99})


def classify(reason_code: int) -> PubackAction:
    """The action for one PUBACK reason code."""
    if reason_code == NO_MATCHING_SUBSCRIBERS:
        return PubackAction.RETRY
    if reason_code < 0x80:
        return PubackAction.DELIVERED
    if reason_code in DEFINITIVE_CODES:
        return PubackAction.HOLD
    return PubackAction.RETRY
