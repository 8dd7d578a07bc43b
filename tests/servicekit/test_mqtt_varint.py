"""The MQTT variable byte integer shared by the light devices and the benches' raw clients."""

from __future__ import annotations

import pytest

from servicekit.mqtt_varint import MAX_VARINT, decode_varint, encode_varint

# MQTT 5 §1.5.5's table: the smallest and largest value of each length.
EDGES = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"),
    (2_097_152, b"\x80\x80\x80\x01"),
    (268_435_455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("value", "raw"), EDGES)
def test_edge_values_encode_and_decode_as_the_spec_lists_them(value: int, raw: bytes) -> None:
    assert encode_varint(value) == raw
    # After a first byte, with a byte of the next field behind it.
    assert decode_varint(b"\x30" + raw + b"\x99", 1) == (value, 1 + len(raw))
    assert decode_varint(bytearray(raw), 0) == (value, len(raw))


@pytest.mark.parametrize(("value", "raw"), EDGES)
def test_a_truncated_varint_is_incomplete_not_a_value(value: int, raw: bytes) -> None:
    for cut in range(len(raw)):
        assert decode_varint(raw[:cut], 0) is None, (value, cut)


def test_more_than_four_bytes_is_malformed() -> None:
    with pytest.raises(ValueError, match="more than four bytes"):
        decode_varint(b"\xff\xff\xff\xff\x01", 0)
    with pytest.raises(ValueError, match="MQTT variable byte integer"):
        encode_varint(MAX_VARINT + 1)
