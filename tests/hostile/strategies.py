"""Hostile inputs: JSON of any shape, near-valid orders with one field turned bad, raw bytes."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from hypothesis import strategies as st

# Characters that break naive validators: C0/C1 controls, line ends, NUL, RTL marks.
CONTROL_CHARS = st.sampled_from(["\n", "\r", "\x00", "\t", "\x1b", "\x7f", "\x85", "\x9f"])
NASTY_INTS = st.sampled_from(
    [-1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63) - 1]
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | NASTY_INTS
    | st.text(max_size=40)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)


def valid_body() -> dict[str, Any]:
    """An intake order body the agent accepts (no order_id: the agent makes one)."""
    return {
        "currency": "EUR",
        "items": [{"sku": "cola-330", "qty": 2, "unit_price": 150}],
        "total": 300,
        "attrs": {"lane": "3"},
    }


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Any:
    """A valid body with one value replaced by anything, or one string field spiked."""
    body: Any = valid_body()
    path = draw(
        st.sampled_from(
            [("currency",), ("total",), ("items", 0, "sku"), ("items", 0, "qty"),
             ("items", 0, "unit_price"), ("attrs", "lane"), ("order_id",), ("items",), ("attrs",)]
        )
    )  # fmt: skip
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(json_values)
    return body


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(lambda v: json.dumps(v).encode(), mutated_bodies()),
    st.builds(lambda d: _deep(d, b"[", b"]"), st.integers(1, 32_000)),
    st.builds(lambda d: _deep(d, b'{"a":', b"}")[:-d] + b"1" + b"}" * d, st.integers(1, 10_000)),
)


def quoted(text: str) -> str:
    """A path segment percent-encoded (so any text reaches the server)."""
    return urllib.parse.quote(text, safe="")


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
