"""What xdist sees of the suite: one id per test, and the groups that keep fixtures whole.

xdist's grouping schedulers key their work by test id: tests sharing an id ran as one
(schemathesis' cases did under pytest 9: only the first case of each test ran, 22 never
did), and a group missing from the id (xdist writes it where pytest 9 no longer reads it)
splits a file's module-scoped server over both workers. Both checks cover this run's tests.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.conftest import module_fixtures


def test_every_collected_test_has_an_id_of_its_own(request: pytest.FixtureRequest) -> None:
    ids = Counter(item.nodeid for item in request.session.items)
    assert [nodeid for nodeid, count in ids.items() if count > 1] == []


def test_a_test_with_a_module_fixture_is_grouped_with_its_file(
    request: pytest.FixtureRequest,
) -> None:
    """Under ``--dist loadgroup`` (``make test``) its id ends with its file as group."""
    loadgroup = getattr(request.config.option, "loadgroup", False)
    for item in request.session.items:
        path = item.nodeid.partition("::")[0]
        grouped = f"@{path}" in item.nodeid
        if module_fixtures(item):
            assert grouped == loadgroup, item.nodeid
