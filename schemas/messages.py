"""The v1 messages: Order, Receipt, Status, StatusQuery, Health, Command as msgspec Structs.

The constraints of the contract table live in the type annotations, so the
decoder, the validator and the exported JSON Schema all come from one source.
Rules that span fields (the total) are checked in ``__post_init__``, which
msgspec also runs while decoding.

Schema evolution: add fields only, each with a default; never change a type.
Unknown keys are ignored when decoding (msgspec's default), so old readers
accept new writers.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from .ids import COMMAND_ID, COMMAND_NAME, DEVICE_ID, END, ORDER_ID, REGION_NAME

MAX_ORDER_BYTES: Final = 16 * 1024
MAX_ITEMS: Final = 100
MAX_ATTRS: Final = 32
MAX_QUERIED_ORDERS: Final = 100
MAX_ATTEMPTS: Final = 32

# Every pattern matches the whole string (schemas.ids.END).
# No C0 or C1 control character (newline, NUL, ESC, DEL …) in any string field.
TEXT_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]*" + END

OrderId = Annotated[
    str, ORDER_ID.meta(description="Unique per device; the agent uses UUIDv7 or ULID.")
]
DeviceId = Annotated[str, DEVICE_ID.meta()]
Sku = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=TEXT_PATTERN)]
Qty = Annotated[int, msgspec.Meta(ge=1, le=1000)]
MinorUnits = Annotated[int, msgspec.Meta(ge=0, description="Amount in minor units.")]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}" + END, description="ISO 4217.")]
EpochMs = Annotated[int, msgspec.Meta(ge=0, description="ms since the Unix epoch.")]
Seq = Annotated[int, msgspec.Meta(ge=0, description="Per-device counter in submit order.")]
ReasonCode = Annotated[str, msgspec.Meta(max_length=64, pattern=TEXT_PATTERN)]
AttrText = Annotated[str, msgspec.Meta(pattern=TEXT_PATTERN)]
RegionName = Annotated[str, REGION_NAME.meta(description="A region's name (geo mode, GEO.md).")]
Count = Annotated[int, msgspec.Meta(ge=0)]
ShortText = Annotated[str, msgspec.Meta(max_length=256, pattern=TEXT_PATTERN)]
CommandId = Annotated[str, COMMAND_ID.meta(description="Unique per command; names it in logs.")]
CommandName = Annotated[str, COMMAND_NAME.meta(description="What to do; see Command.")]

# The commands an agent of this version carries out; any other name is logged and ignored.
RETRY_HELD: Final = "retry_held"


class Item(msgspec.Struct, frozen=True):
    """One order line."""

    sku: Sku
    qty: Qty
    unit_price: MinorUnits


class Order(msgspec.Struct, frozen=True, omit_defaults=True):
    """An order, as a device publishes it to ``v1/devices/{device_id}/orders``."""

    v: Literal[1]
    order_id: OrderId
    device_id: DeviceId
    seq: Seq
    created_at: EpochMs
    currency: Currency
    items: Annotated[tuple[Item, ...], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    total: MinorUnits
    attrs: Annotated[dict[AttrText, AttrText], msgspec.Meta(max_length=MAX_ATTRS)] = {}
    # Contract addition (geo mode, GEO.md): the regions this order was published
    # to, in order. The first name is the order's authority, forever. Not part
    # of the dedup hash: a resend to another region adds a name, not a conflict.
    attempts: Annotated[
        tuple[RegionName, ...],
        msgspec.Meta(
            max_length=MAX_ATTEMPTS,
            description="Regions this order was published to; the first owns it.",
        ),
    ] = ()

    def __post_init__(self) -> None:
        expected = sum(item.qty * item.unit_price for item in self.items)
        if self.total != expected:
            # msgspec turns a ValueError raised here into a ValidationError.
            raise ValueError(f"total {self.total} != sum of qty * unit_price {expected}")


# `pending` (geo mode): the order's authority region is unreachable; the
# device keeps the order and retries later. It settles nothing.
ReceiptResult = Literal["accepted", "duplicate", "rejected", "pending"]
OrderStatus = Literal["confirmed", "rejected", "fulfilled", "failed"]


class Receipt(msgspec.Struct, frozen=True):
    """The bridge's answer to every message on a device's orders topic.

    ``order_id`` is None when the payload was too broken to carry one.
    ``duplicate`` means "already accepted earlier" and settles an order like
    ``accepted`` does. ``pending`` (geo mode, reason ``authority_unreachable``)
    settles nothing: the device keeps the order and retries it later.
    """

    v: Literal[1]
    order_id: OrderId | None
    result: ReceiptResult
    reason: ReasonCode | None
    at: EpochMs


class Status(msgspec.Struct, frozen=True):
    """A pipeline state change, published to ``v1/devices/{device_id}/status``."""

    v: Literal[1]
    order_id: OrderId
    status: OrderStatus
    reason: ReasonCode | None
    at: EpochMs


class StatusQuery(msgspec.Struct, frozen=True):
    """Contract addition (status recovery): a device asks for its orders' statuses again.

    Published to ``v1/devices/{device_id}/status-query`` for orders that were
    accepted but whose terminal status the device never heard (the broker may
    have died with it queued). The pipeline answers every order it knows with
    the order's current status as an ordinary :class:`Status` on the device's
    status topic; it ignores ids it does not know, and the device asks again
    later.
    """

    v: Literal[1]
    order_ids: Annotated[
        tuple[OrderId, ...], msgspec.Meta(min_length=1, max_length=MAX_QUERIED_ORDERS)
    ]


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    """Contract addition: a device's health, on ``v1/devices/{device_id}/health``.

    The agent publishes it every few seconds and whenever a figure changes.
    Its MQTT Will is the same message with ``online`` false and no figures,
    so the broker announces a device that vanished without a goodbye.
    """

    v: Literal[1]
    online: bool
    at: EpochMs
    outbox_depth: Count | None = None
    outbox_bytes: Count | None = None
    oldest_unreceipted_age_ms: Count | None = None
    held: Count | None = None
    last_broker_error: ShortText | None = None
    agent_version: ShortText | None = None


class Command(msgspec.Struct, frozen=True):
    """Contract addition (device commands): the cloud asks a device to do something.

    Published by the pipeline's service account only, at QoS 1 and not
    retained, to ``v1/devices/{device_id}/cmd`` (one device) or
    ``v1/fleet/cmd`` (every device). ``cmd`` is ``retry_held``: re-queue every
    held order, as ``edge-agent retry --held`` does on the device. A command is
    idempotent, and an agent ignores an ``id`` it has already carried out and
    any ``cmd`` it does not know (``cmd`` is a plain string, so a newer command
    never fails to decode). ``issued_at`` is the sender's clock, for logs only.
    """

    v: Literal[1]
    cmd: CommandName
    id: CommandId
    issued_at: EpochMs
