"""Errors raised by the service conventions.

Hierarchy::

    ServiceKitError        root
    ├── ConfigError        settings or a connection URL are missing, unknown or invalid
    └── LoopFailed         a background loop that cannot go on ended: the process must exit
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


class LoopFailed(ServiceKitError):
    """A background loop ended with an error it cannot recover from.

    ``loop`` names it; entrypoints exit non-zero so systemd or compose restarts the service.
    """

    def __init__(self, loop: str, detail: str) -> None:
        super().__init__("loop_failed", f"{loop}: {detail}")
        self.loop = loop
