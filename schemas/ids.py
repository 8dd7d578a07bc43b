"""The contract's id rules: device, order, region and command ids, one definition each.

:mod:`schemas.messages` builds its ``DeviceId``, ``OrderId`` and ``RegionName``
from these rules, so the decoder, the exported JSON Schema and every check of
an id that arrives outside a message (a topic level, a URL path, a config
value) apply the same rule.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

# msgspec applies patterns with ``re.search``, where ``$`` also matches before a
# trailing newline; ECMA-262 (the exported JSON Schema's dialect) has no ``\Z``.
# "Not followed by any character" means end of string in both.
END: Final = r"(?![\s\S])"


class IdRule:
    """Ids of ``min_length`` to ``max_length`` characters of the class ``[chars]``."""

    def __init__(self, chars: str, min_length: int, max_length: int) -> None:
        self.chars = chars
        self.min_length = min_length
        self.max_length = max_length
        self.regex: Final = rf"[{chars}]{{{min_length},{max_length}}}"
        self._whole = re.compile(self.regex)

    def fullmatch(self, value: str) -> bool:
        """True when all of ``value`` (no trailing newline) follows the rule."""
        return self._whole.fullmatch(value) is not None

    def meta(self, description: str | None = None) -> msgspec.Meta:
        """The rule as msgspec constraints, for ``Annotated[str, rule.meta()]``."""
        return msgspec.Meta(
            min_length=self.min_length,
            max_length=self.max_length,
            pattern=rf"^[{self.chars}]+" + END,
            description=description,
        )


DEVICE_ID: Final = IdRule("A-Za-z0-9_.-", 1, 64)
ORDER_ID: Final = IdRule("A-Za-z0-9_-", 8, 64)
REGION_NAME: Final = IdRule("a-z0-9-", 1, 32)
# Device commands (contract addition): the command's id, and its name.
COMMAND_ID: Final = IdRule("A-Za-z0-9_-", 8, 64)
COMMAND_NAME: Final = IdRule("a-z0-9_", 1, 32)


def is_device_id(value: str) -> bool:
    """True when all of ``value`` is a device id: 1–64 chars of ``[A-Za-z0-9_.-]``."""
    return DEVICE_ID.fullmatch(value)


def is_order_id(value: str) -> bool:
    """True when all of ``value`` is an order id: 8–64 chars of ``[A-Za-z0-9_-]``."""
    return ORDER_ID.fullmatch(value)


def is_region_name(value: str) -> bool:
    """True when all of ``value`` is a region name: 1–32 chars of ``[a-z0-9-]``."""
    return REGION_NAME.fullmatch(value)
