"""Export the v1 messages as JSON Schema files in ``schemas/json/``.

Run ``python -m schemas.json_schema`` after changing a message type; a test
fails while the committed files differ from what the types generate.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Final

import msgspec

from .messages import Command, Health, Order, Receipt, Status, StatusQuery

JSON_DIR: Final = Path(__file__).parent / "json"
MESSAGES: Final = {
    "order": Order,
    "receipt": Receipt,
    "status": Status,
    "status-query": StatusQuery,
    "health": Health,
    "command": Command,
}


def clean_descriptions(node: Any) -> Any:
    """Dedent every ``description`` the way ``inspect.cleandoc`` does.

    Docstrings reach the schema indented as written before Python 3.13 and
    dedented from 3.13 on; cleaning them here keeps the committed files the
    same whichever Python or msgspec renders them.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [clean_descriptions(value) for value in node]
    return node


def render(name: str) -> str:
    """The JSON Schema document for one message, as committed."""
    schema = clean_descriptions(msgspec.json.schema(MESSAGES[name]))
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{name}.v1.json",
        "description": "Encoded as MessagePack on the wire; unknown keys are ignored.",
        **schema,
    }
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write every schema file."""
    JSON_DIR.mkdir(exist_ok=True)
    for name in MESSAGES:
        (JSON_DIR / f"{name}.v1.json").write_text(render(name))


if __name__ == "__main__":
    main()
