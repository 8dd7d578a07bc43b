"""An idle agent started as its systemd unit starts it loads nothing it does not use (issue 25).

Guards the idle RSS levers of docs/explanation/benchmarks.md (Memory): tracing
off loads no OpenTelemetry, the unit's FROZENLIST_NO_EXTENSIONS keeps
frozenlist's C extension out, and no fleet, pipeline, bridge or test code
rides along.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.agent_intake import unit_environment

from .agent_process import AgentProcess

NOT_ON_AN_IDLE_AGENT = (
    "opentelemetry",
    "fleet",
    "pipeline",
    "bridge",
    "bench",
    "testrig",
    "pytest",
)


def test_idle_agent_loads_no_unused_module(
    tmp_path: Path, device_id: str, mqtt_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit_env = unit_environment()
    assert unit_env.get("FROZENLIST_NO_EXTENSIONS") == "1"
    for name, value in unit_env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "modules.txt"
    monkeypatch.setenv("AGENT_MODULES_OUT", str(out))
    agent = AgentProcess(
        tmp_path,
        device_id=device_id,
        mqtt_url=mqtt_url,
        db=tmp_path / "o.db",
        module="tests.edge_agent.modules_agent",
    )
    agent.start()
    try:
        assert agent.sigterm() == 0, agent.log_tail()
    finally:
        agent.stop()
    modules = set(out.read_text().split())
    assert {"edge_agent.agent", "aiohttp.web", "frozenlist"} <= modules  # a real agent ran
    assert "frozenlist._frozenlist" not in modules
    loaded = {name.split(".")[0] for name in modules} & set(NOT_ON_AN_IDLE_AGENT)
    assert not loaded, f"an idle agent loaded {sorted(loaded)}"
