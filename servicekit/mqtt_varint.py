"""The MQTT variable byte integer (MQTT 5 §1.5.5), for the raw MQTT clients.

A packet's remaining length and a PUBLISH's property length are written in it:
seven bits a byte, least significant first, the high bit set on every byte but
the last, four bytes at most (268,435,455). The clients that build and parse
packets by hand share these two functions: the light devices
(:mod:`fleet.light`), the broker sizing bench, the benches' raw publishers and
the enrolment's dynamic-security control client (:mod:`enrolment.control`).
It needs no MQTT library, so the edge and enrolment installs can import it.
"""

from __future__ import annotations

MAX_VARINT = 268_435_455  # four bytes of seven bits
MAX_BYTES = 4


def encode_varint(value: int) -> bytes:
    """``value`` (0 … 268,435,455) as a variable byte integer."""
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:  # every packet of a light device fits in two bytes
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value > MAX_VARINT:
        raise ValueError(f"{value} does not fit in an MQTT variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def decode_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """The variable byte integer at ``data[pos]`` and the position after it; None when
    ``data`` ends before its last byte (a packet not wholly read yet).

    Raises ValueError on a fifth byte (malformed: four at most).
    """
    end = len(data)
    if pos < end and data[pos] < 0x80:  # one byte: most lengths a device sees
        return data[pos], pos + 1
    value = shift = 0
    for i in range(pos, min(end, pos + MAX_BYTES)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if end - pos >= MAX_BYTES:
        raise ValueError("malformed variable byte integer: more than four bytes")
    return None
