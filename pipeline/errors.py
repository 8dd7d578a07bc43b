"""Errors of the pipeline.

Hierarchy::

    PipelineError            root of everything the pipeline raises
    ├── StepError            a step could not finish one order; the entry stays
    │                        pending, is redelivered and ends in the DLQ after
    │                        ``max_deliveries`` (carries a ``reason`` code)
    │   └── TransientError   worth retrying soon (payment gateway unavailable)
    ├── PaymentDeclined      the gateway refused for good: the order ends ``failed``
    ├── CatalogError         a catalog file cannot be read or is invalid
    ├── UnknownStepError     a step name in the config is not registered
    ├── ReplayError          a DLQ entry cannot be replayed (``reason`` says why)
    └── TokenConfigError     API tokens unreadable or malformed, or missing on a
                             non-loopback bind (the API refuses to start)

Business outcomes (``rejected``, ``failed``) are not errors: steps record them
on the order's context. Errors are for what the pipeline could not decide.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of the pipeline's errors; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StepError(PipelineError):
    """A step failed for one order; the entry is retried, then dead-lettered."""


class TransientError(StepError):
    """A failure that may pass by itself (a timeout, an unavailable gateway)."""


class PaymentDeclined(PipelineError):
    """The payment gateway refused the charge permanently."""


class CatalogError(PipelineError):
    """A catalog file is unreadable or breaks the catalog format."""


class UnknownStepError(PipelineError):
    """The configured step list names a step nobody registered."""


class ReplayError(PipelineError):
    """A dead-lettered entry cannot be replayed: ``not_found``, ``not_replayable``,
    ``already_replayed``."""

    def __init__(self, reason: str, detail: str, replayed_as: str | None = None) -> None:
        super().__init__(reason, detail)
        self.replayed_as = replayed_as


class TokenConfigError(PipelineError):
    """The orders API's tokens cannot be loaded, or are required and absent."""
