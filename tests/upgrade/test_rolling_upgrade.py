"""A rolling upgrade from the previous tagged release to this tree, under load.

The previous release (``PREVIOUS_RELEASE``, v0.1.0 today) is installed from
its own lock (:mod:`tests.upgrade.old_release`). Its bridges, pipeline replicas and
agents start on a real Mosquitto and a Redis with the old release's ACL users;
load is offered to every agent throughout. Then, with the commands of
``docs/how-to/upgrade.md`` as written: the new release's ACL is loaded (no
replica of either release is refused anything after), the bridge replicas are
replaced by this tree's one by one, then the pipeline replicas; half the
agents stay old, the other half restart as this tree's on the same outbox
file. The end: 0 lost, 0 duplicated, 0 stuck, 0 processed twice, every status
heard by its agent (:func:`fleet.verify.verify`).

``UPGRADE_SLOW=1`` adds a longer form: more agents and replicas, more orders.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from edge_agent._migrations import SCHEMA_VERSION
from fleet.statuses import order_statuses
from fleet.verify import OrderRef, Verdict, verify
from pipeline.names import TERMINAL_STATUSES
from schemas.names import MANIFEST_KEY
from servicekit.version import package_version
from testrig.servers import MosquittoProcess, RedisProcess, free_port
from tests.tools import require_tool
from tests.upgrade.old_release import REPO, Release, file_at, previous_release
from tests.upgrade.rig import Load, Unit, http_json, run_block, stop_all
from tests.upgrade.runbook import runbook_blocks

PAGE = REPO / "docs" / "how-to" / "upgrade.md"
ACL = "redis-acl/users.acl"
SHOWN_DENIAL = ("username", "age-seconds", "client-info")  # of an ACL LOG entry
PASSWORD = "upgrade-test"  # each user's password: this, a dash, its name
CATALOG = REPO / "pipeline" / "demo_catalog.toml"
NEW_BIN = Path(sys.executable).parent
SHARDS = 4
SETTLE_TIMEOUT_S = 90.0
AGENT_PAGE = 500  # the agents' most per page


@dataclass(frozen=True)
class Form:
    """How big a run is."""

    bridges: int
    pipelines: int
    agents: int
    per_agent_per_s: float
    # Seconds of load before the first replacement and after the last one.
    lead_s: float


CHEAP = Form(bridges=2, pipelines=2, agents=4, per_agent_per_s=8, lead_s=1)
LONG = Form(bridges=3, pipelines=3, agents=12, per_agent_per_s=10, lead_s=15)


@pytest.fixture(scope="module")
def old() -> Release:
    """The previous release, installed from its own lock."""
    return previous_release()


@pytest.fixture
def blocks() -> dict[str, str]:
    """The upgrade runbook's tested commands."""
    return runbook_blocks(PAGE)


@pytest.fixture
def units() -> Iterator[list[Unit]]:
    """Every unit a test starts; killed at the end whatever happened."""
    started: list[Unit] = []
    yield started
    for unit in started:
        unit.kill()


def test_runbook_has_the_commands_the_test_runs(blocks: dict[str, str]) -> None:
    """The page marks every command the upgrade test runs, and no other."""
    assert set(blocks) == {
        "stop", "bridge-start", "ready", "ops-versions", "pipeline-start", "agent-start",
        "outbox-version", "acl-load",
    }  # fmt: skip


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(CHEAP, id="cheap"),
        pytest.param(
            LONG, id="long",
            marks=[pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.skipif(
                os.environ.get("UPGRADE_SLOW") != "1", reason="set UPGRADE_SLOW=1 (about 2 min)")],
        ),
    ],
)  # fmt: skip
def test_rolling_upgrade_from_the_previous_release(
    form: Form, old: Release, blocks: dict[str, str], units: list[Unit], tmp_path: Path
) -> None:
    """Bridges, then pipeline replicas, then half the agents go from the old release to this
    tree under load: nothing lost, duplicated or stuck, and every agent heard every end."""
    for tool in ("curl", "jq", "sqlite3"):
        require_tool(tool)
    new_version = package_version()
    old_schema = _old_schema_version(old)
    t0 = time.monotonic()

    def took(what: str) -> None:
        print(f"{time.monotonic() - t0:6.1f} s  {what}")

    # Redis runs with the old release's ACL users, as a deployment of it does.
    acl_file = tmp_path / "users.acl"
    acl_file.write_text(_test_passwords(file_at(old.commit, ACL)))
    new_acl = tmp_path / "users.acl.new"
    new_acl.write_text(_test_passwords((REPO / ACL).read_text()))
    with (
        MosquittoProcess(tmp_path / "mosquitto") as broker,
        RedisProcess.production(
            tmp_path / "redis", extra_args=("--aclfile", str(acl_file))
        ) as redis_server,
    ):

        def user(name: str) -> str:
            return redis_server.url.replace("redis://", f"redis://{name}:{PASSWORD}-{name}@")

        base = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
            "ORDERS_MQTT_URL": broker.url,
        }  # fmt: skip
        cloud = {**base, "ORDERS_SHARDS": str(SHARDS)}
        run_block(
            f"order-pipeline catalog load {CATALOG}",
            {**cloud, "ORDERS_REDIS_URL": user("admin"), "PATH": f"{old.bin}:{base['PATH']}"},
        )

        def unit(name: str, block: str, **env: str) -> Unit:
            made = Unit(name, blocks[block], env, tmp_path)
            units.append(made)
            return made

        bridges = [
            unit(
                f"bridge-{i}",
                "bridge-start",
                **cloud,
                ORDERS_REDIS_URL=user("bridge"),
                NAME=f"bridge-{i}",
                PORT=str(free_port()),
                ORDERS_TRIM_EVERY_BATCHES="0",
            )
            for i in range(form.bridges)
        ]
        pipelines = [
            unit(
                f"pipeline-{i}",
                "pipeline-start",
                **cloud,
                ORDERS_REDIS_URL=user("pipeline"),
                WORKERS="1",
                PORT=str(free_port()),
                ORDERS_CLAIM_IDLE_MS="3000",
            )
            for i in range(form.pipelines)
        ]
        agents = [
            unit(
                f"agent-{i}",
                "agent-start",
                **base,
                DEVICE_ID=f"upgrade-{i:03d}",
                DB=str(tmp_path / f"outbox-{i}.db"),
                PORT=str(free_port()),
                ORDERS_HEALTH_INTERVAL_S="1",
                ORDERS_RECEIPT_TIMEOUT_S="5",
                ORDERS_STATUS_QUERY_DELAY_S="5",
                ORDERS_RECONNECT_MAX_S="2",
            )
            for i in range(form.agents)
        ]
        for part in (*bridges, *pipelines, *agents):
            part.spawn(old.bin)
        for part in (*bridges, *pipelines, *agents):
            part.wait_ready(blocks["ready"])
        took("old release started")

        load = Load({a.env["DEVICE_ID"]: int(a.env["PORT"]) for a in agents}, form.per_agent_per_s)
        load.start()
        try:
            time.sleep(form.lead_s)
            admin = {**base, "REDIS_ADMIN_URL": user("admin")}
            acl_env = {**admin, "NEW_ACL": str(new_acl), "ACL_FILE": str(acl_file)}
            # Why the ACL goes first: under the old rules a new bridge cannot read the manifest.
            assert _manifest_refused(user("bridge"))
            with redis.Redis.from_url(user("admin")) as client:
                client.acl_log_reset()  # that denial was ours; from now on there must be none
            run_block(blocks["acl-load"], acl_env)
            assert not _manifest_refused(user("bridge"))
            took("new ACL loaded")
            for bridge in bridges:
                assert bridge.stop(blocks["stop"]) == 0, f"{bridge.name} did not drain cleanly"
                bridge.start(NEW_BIN, blocks["ready"])
            took("bridges upgraded")
            for pipeline in pipelines:
                assert pipeline.stop(blocks["stop"]) == 0
                took(f"{pipeline.name} stopped")
                pipeline.start(NEW_BIN, blocks["ready"])
            took("pipeline upgraded")
            upgraded = agents[: len(agents) // 2]
            for agent in upgraded:
                assert agent.stop(blocks["stop"]) == 0
                version = run_block(blocks["outbox-version"], agent.env)
                assert int(version) == old_schema
                agent.start(NEW_BIN, blocks["ready"])
            took("agents upgraded")
            time.sleep(form.lead_s)
        finally:
            load.stop()

        accepted = list(load.accepted)
        assert len(accepted) >= form.agents * form.per_agent_per_s, "too little load offered"
        heard = _wait_heard(agents, accepted)
        took(f"{len(heard)}/{len(accepted)} heard")

        verdict = asyncio.run(_verify(user("admin"), accepted, heard))
        assert verdict.ok, verdict
        assert verdict.checked == len(set(accepted))

        ops = _ops_versions(
            blocks["ops-versions"], {**base, "API": f"http://127.0.0.1:{pipelines[0].env['PORT']}"}
        )
        assert {b["version"] for b in ops["bridges"] if b["state"] == "ready"} == {new_version}
        agent_versions = {v["version"]: v["devices"] for v in ops["agents"]}
        assert agent_versions.get(new_version) == len(upgraded), ops
        assert agent_versions.get(old.tag.removeprefix("v")) == len(agents) - len(upgraded), ops
        # Old and new replicas alike ran under the new rules without a single denial.
        with redis.Redis.from_url(user("admin")) as client:
            denied = client.acl_log()
            assert denied == [], [
                " ".join(f"{key}={entry[key]}" for key in SHOWN_DENIAL) for entry in denied
            ]
        assert stop_all([*bridges, *pipelines, *agents], blocks["stop"]) == [0] * len(units)
        for agent in upgraded:  # migrated by the new agent, read now that it has stopped
            assert int(run_block(blocks["outbox-version"], agent.env)) == SCHEMA_VERSION


def _wait_heard(agents: list[Unit], accepted: list[OrderRef]) -> set[OrderRef]:
    """The accepted orders whose agent shows a final status, once all do or after the timeout."""
    wanted = set(accepted)
    heard: set[OrderRef] = set()
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while heard != wanted and time.monotonic() < deadline:
        heard = {
            (agent.env["DEVICE_ID"], order_id)
            for agent in agents
            for order_id, status in _agent_statuses(agent.env["PORT"])
            if status in TERMINAL_STATUSES
        } & wanted
        if heard != wanted:
            time.sleep(0.5)
    return heard


def _agent_statuses(port: str) -> Iterator[tuple[str, str | None]]:
    """(order_id, status) of every order in an agent's outbox, from its intake's list."""
    cursor = ""
    while True:
        url = f"http://127.0.0.1:{port}/v1/orders?limit={AGENT_PAGE}{cursor}"
        status, page = http_json(url)
        assert status == 200, (url, status, page)
        for order in page["orders"]:
            yield order["order_id"], order["status"]
        if page["next_cursor"] is None:
            return
        cursor = f"&cursor={page['next_cursor']}"


def _ops_versions(block: str, env: dict[str, str]) -> dict[str, Any]:
    """The runbook's ops-versions answer, after the agents' next health reports."""
    out: dict[str, Any] = json.loads(run_block(block, env))
    return out


async def _verify(redis_url: str, accepted: list[OrderRef], heard: set[OrderRef]) -> Verdict:
    client = aioredis.from_url(redis_url)
    try:

        async def statuses(refs: list[OrderRef]) -> list[str | None]:
            return await order_statuses(client, refs, SHARDS)

        return await verify(
            client, accepted, shards=SHARDS, statuses=statuses, heard=heard, pipeline_writes=True
        )
    finally:
        await client.aclose()


def _old_schema_version(old: Release) -> int:
    """The outbox schema version the old release writes (its ``SCHEMA_VERSION``)."""
    code = "from edge_agent._migrations import SCHEMA_VERSION; print(SCHEMA_VERSION)"
    return int(run_block(f"python -c '{code}'", {"PATH": f"{old.bin}:{os.environ['PATH']}"}))


def test_a_mark_without_its_block_is_refused(tmp_path: Path) -> None:
    """A tested mark not followed by an sh block, or a name marked twice, fails the read."""
    page = tmp_path / "page.md"
    page.write_text("<!-- tested: a -->\ntext\n")
    with pytest.raises(ValueError, match="not followed"):
        runbook_blocks(page)
    page.write_text("<!-- tested: a -->\n```sh\nx\n```\n<!-- tested: a -->\n```sh\ny\n```\n")
    with pytest.raises(ValueError, match="twice"):
        runbook_blocks(page)
    page.write_text("<!-- tested: a -->\n```sh\necho 1\n```\n")
    assert runbook_blocks(page) == {"a": "echo 1\n"}


def _test_passwords(acl: str) -> str:
    """An ACL file with the test's passwords for the shipped placeholders."""
    return acl.replace(">change-me-", f">{PASSWORD}-")


def _manifest_refused(url: str) -> bool:
    """Whether the user of ``url`` is refused a read of the deployment manifest."""
    with redis.Redis.from_url(url) as client:
        try:
            client.get(MANIFEST_KEY)
        except NoPermissionError:
            return True
    return False
