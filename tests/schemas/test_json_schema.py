"""The committed JSON Schema files match what the message types generate."""

from __future__ import annotations

import json

import pytest

from schemas.json_schema import JSON_DIR, MESSAGES, clean_descriptions, render


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_committed_schema_matches_the_code(name: str) -> None:
    """Drift check: regenerate with `python -m schemas.json_schema` when this fails."""
    path = JSON_DIR / f"{name}.v1.json"
    assert path.read_text() == render(name), f"{path} is stale"


def test_order_schema_states_the_contract_bounds() -> None:
    """Spot-check that the exported schema carries the contract's limits."""
    schema = json.loads((JSON_DIR / "order.v1.json").read_text())
    order = schema["$defs"]["Order"]["properties"]
    assert order["order_id"]["minLength"] == 8
    assert order["order_id"]["maxLength"] == 64
    assert order["items"]["maxItems"] == 100
    assert order["attrs"]["maxProperties"] == 32


def test_descriptions_do_not_depend_on_docstring_indentation() -> None:
    """Python 3.13 dedents docstrings, older ones don't: the files must be the same."""
    indented = {"description": "First line.\n\n        Indented as written.", "x": [{}]}
    dedented = {"description": "First line.\n\nIndented as written.", "x": [{}]}
    assert clean_descriptions(indented) == clean_descriptions(dedented) == dedented
