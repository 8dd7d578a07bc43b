"""The contract's id rules: one definition, the same answer in code and in the decoder."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.ids import DEVICE_ID, ORDER_ID, REGION_NAME, IdRule
from schemas.messages import DeviceId, OrderId, RegionName

# Every class the rules draw from, a few that none allows, and the newline that
# a `$`-anchored pattern would let through at the end.
CHARS = st.sampled_from("aZz09_.-:/\n\r\x00 é+#${}")


@pytest.mark.parametrize(
    ("rule", "annotated"),
    [(DEVICE_ID, DeviceId), (ORDER_ID, OrderId), (REGION_NAME, RegionName)],
    ids=["device_id", "order_id", "region_name"],
)
@given(value=st.text(CHARS, max_size=70))
def test_a_rule_accepts_exactly_what_the_decoder_accepts(
    rule: IdRule, annotated: Any, value: str
) -> None:
    """``rule.fullmatch`` and msgspec's check of the contract type agree on any text."""
    try:
        msgspec.convert(value, annotated)
    except msgspec.ValidationError:
        decoded = False
    else:
        decoded = True
    assert rule.fullmatch(value) is decoded


def test_the_rules_are_the_contract_table() -> None:
    """Lengths and characters as the v1 contract states them."""
    assert DEVICE_ID.fullmatch("k" * 64)
    assert not DEVICE_ID.fullmatch("k" * 65)
    assert DEVICE_ID.fullmatch("kiosk-7.a_b")
    assert not DEVICE_ID.fullmatch("kiosk 7")
    assert ORDER_ID.fullmatch("o" * 8)
    assert not ORDER_ID.fullmatch("o" * 7)
    assert not ORDER_ID.fullmatch("order.123")
    assert REGION_NAME.fullmatch("eu-west-1")
    assert not REGION_NAME.fullmatch("EU")
    assert not REGION_NAME.fullmatch("r" * 33)
    assert not REGION_NAME.fullmatch("")
