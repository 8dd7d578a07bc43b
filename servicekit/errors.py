"""Errors raised by the service conventions.

Hierarchy::

    ServiceKitError        root
    └── ConfigError        settings or a connection URL are missing, unknown or invalid
"""

from __future__ import annotations


class ServiceKitError(Exception):
    """Root of the ``servicekit`` errors; ``reason`` is a machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(ServiceKitError):
    """Settings are missing, unknown or of the wrong type, or a URL is malformed."""

    def __init__(self, detail: str, reason: str = "invalid_config") -> None:
        super().__init__(reason, detail)
