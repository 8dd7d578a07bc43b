"""Errors of the test rig.

Hierarchy::

    RigError            root: a piece of the rig did not come up or did not answer
    ├── ServerError     a server binary is missing, or the server did not come up
    ├── PowerCutError   the power-cut mount could not be started, or did not answer a command
    └── ProxyError      the TCP proxy's thread did not start
"""

from __future__ import annotations


class RigError(RuntimeError):
    """A piece of the test rig did not come up or did not answer."""


class ServerError(RigError):
    """A server could not be found or started."""


class PowerCutError(RigError):
    """The power-cut mount could not be started, or did not answer a command."""


class ProxyError(RigError):
    """The TCP proxy's thread did not start."""
