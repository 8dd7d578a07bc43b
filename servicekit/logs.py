"""The one logging set-up every service's entrypoint calls: JSON lines via structlog.

Components never configure logging; they get a logger with
``structlog.get_logger(__name__)`` and bind ``device_id``/``order_id`` with
``structlog.contextvars.bound_contextvars`` where known.
"""

from __future__ import annotations

import logging
import sys

import structlog

MAX_LOGGED_PAYLOAD_BYTES = 512


def configure_logging(level: str = "info", *, service: str) -> None:
    """Route structlog and stdlib logging to JSON lines on stderr."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("msg"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # Libraries that use stdlib logging (paho, redis, aiohttp) get the same format.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.EventRenamer("msg"),
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def truncate(payload: bytes) -> str:
    """A payload fit for a log line: hex of at most the first 512 bytes."""
    head = payload[:MAX_LOGGED_PAYLOAD_BYTES].hex()
    return (
        head
        if len(payload) <= MAX_LOGGED_PAYLOAD_BYTES
        else f"{head}…(+{len(payload) - MAX_LOGGED_PAYLOAD_BYTES}B)"
    )
