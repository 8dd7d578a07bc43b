"""A loud warning when a service connects to Redis without a password.

Production Redis runs with ACL users (``redis-acl/users.acl``); a URL without
a password means the server lets anyone in, or this service will be refused.
Either way an operator must hear about it. The defaults stay password-less so
that the dev stack and the tests run without setup.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import structlog

log = structlog.get_logger(__name__)


def redis_url_has_password(url: str) -> bool:
    """True when ``url`` carries a password (``redis://user:password@host``)."""
    return bool(urlsplit(url).password)


def warn_if_redis_unauthenticated(url: str) -> bool:
    """Log a warning when ``url`` has no password; return whether it warned."""
    if redis_url_has_password(url):
        return False
    log.warning(
        "redis_url_without_password",
        redis_url=url,
        hint="production Redis uses ACL users: redis://USER:PASSWORD@host:6379/0 "
        "(redis-acl/README.md); without a password anyone on the network can read "
        "and change every order",
    )
    return True
