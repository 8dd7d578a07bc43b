"""One deployment for the runbook tests: started once, each test runs its page against it.

Starting Redis, the production broker, two bridge replicas and the pipeline
costs most of a runbook test on a busy machine; the pages leave the deployment
working (that is their point), so the tests share it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.enrolment.conftest import dynsec_plugin

from .rig import Rig, running_rig

# RUNBOOK_SLOW=1: two bridge replicas, so the restarts roll one replica while the
# other takes the orders; the default form has one (each Python start costs seconds).
SLOW = os.environ.get("RUNBOOK_SLOW") == "1"
BRIDGES = 2 if SLOW else 1
LOAD_DEVICES = [f"load-{i:03d}" for i in range(20 if SLOW else 10)]
# Orders per second the load offers over LOAD_DEVICES.
RATE_PER_S = 40.0 if SLOW else 20.0


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Redis with ACL users, the production broker (TLS, dynamic security), bridges, pipeline."""
    dynsec_plugin()  # skips (fails under CI=true) without the plugin
    workdir = tmp_path_factory.mktemp("runbooks")
    with running_rig(workdir, LOAD_DEVICES, bridges=BRIDGES) as deployment:
        yield deployment
