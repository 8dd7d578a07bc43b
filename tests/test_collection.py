"""What xdist sees of the suite: one id per test, and the groups that keep fixtures whole.

xdist hands tests to its workers by id: tests sharing an id ran as one between them
(schemathesis' cases did under pytest 9: 22 tests missing from the summary), and a group
missing from the id (xdist writes it where pytest 9 no longer reads it) splits a file's
module-scoped server over both workers. Both checks cover the tests of this run.
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
