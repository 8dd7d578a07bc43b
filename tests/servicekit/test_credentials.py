"""A Redis URL without a password is logged loudly; one with a password is not."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from servicekit.credentials import redis_url_has_password, warn_if_redis_unauthenticated


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "redis://bridge@redis:6379/0", "redis://bridge:@redis:6379/0",
     "rediss://redis:6380/0"],
)  # fmt: skip
def test_url_without_password_warns(url: str) -> None:
    """No password (none, or empty) → one warning naming the problem."""
    assert not redis_url_has_password(url)
    with capture_logs() as logs:
        assert warn_if_redis_unauthenticated(url)
    assert [(e["log_level"], e["event"]) for e in logs] == [
        ("warning", "redis_url_without_password")
    ]


@pytest.mark.parametrize("url", ["redis://bridge:s3cret@redis:6379/0", "rediss://:pw@r:6380/0"])
def test_url_with_password_is_quiet(url: str) -> None:
    """A password → no warning."""
    with capture_logs() as logs:
        assert not warn_if_redis_unauthenticated(url)
    assert logs == []
