"""One deployment for the runbook tests: started once, each test runs its page against it.

Starting Redis, the production broker, two bridge replicas and the pipeline
costs most of a runbook test on a busy machine; the pages leave the deployment
working (that is their point), so the tests share it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.enrolment.conftest import dynsec_plugin

from .rig import Rig, running_rig

LOAD_DEVICES = [f"load-{i:03d}" for i in range(20)]


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Redis with ACL users, the production broker (TLS, dynamic security), 2 bridges, pipeline."""
    dynsec_plugin()  # skips (fails under CI=true) without the plugin
    with running_rig(tmp_path_factory.mktemp("runbooks"), LOAD_DEVICES, bridges=2) as deployment:
        yield deployment
