"""Hypothesis strategies for valid v1 messages."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from schemas import Item, Order

ORDER_ID_ALPHABET = string.ascii_letters + string.digits + "_-"
DEVICE_ID_ALPHABET = ORDER_ID_ALPHABET + "."
# Free-text fields (sku, attrs, reason) take any character but a C0/C1 control.
TEXT_CHARS = st.characters(exclude_categories=("Cc", "Cs"))

order_ids = st.text(ORDER_ID_ALPHABET, min_size=8, max_size=64)
device_ids = st.text(DEVICE_ID_ALPHABET, min_size=1, max_size=64)
items = st.builds(
    Item,
    sku=st.text(TEXT_CHARS, min_size=1, max_size=64),
    qty=st.integers(1, 1000),
    unit_price=st.integers(0, 10**9),
)


@st.composite
def orders(draw: st.DrawFn) -> Order:
    """Any order the contract accepts (kept under the 16 KiB cap)."""
    order_items = tuple(draw(st.lists(items, min_size=1, max_size=20)))
    return Order(
        v=1,
        order_id=draw(order_ids),
        device_id=draw(device_ids),
        seq=draw(st.integers(0, 2**63 - 1)),
        created_at=draw(st.integers(0, 2**62)),
        currency=draw(st.text(string.ascii_uppercase, min_size=3, max_size=3)),
        items=order_items,
        total=sum(i.qty * i.unit_price for i in order_items),
        attrs=draw(
            st.dictionaries(
                st.text(TEXT_CHARS, max_size=16), st.text(TEXT_CHARS, max_size=32), max_size=8
            )
        ),
    )
