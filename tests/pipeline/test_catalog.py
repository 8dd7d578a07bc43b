"""Catalog files (JSON, TOML) into Redis, `order-pipeline catalog load`, and the step registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from pipeline._lua import Scripts
from pipeline.catalog import read_catalog
from pipeline.config import PipelineConfig
from pipeline.errors import CatalogError, UnknownStepError
from pipeline.names import CATALOG_KEY, stock_key
from pipeline.steps import StepDeps, build_chain, registered
from schemas.names import DEFAULT_SHARDS

DEMO = Path(__file__).parents[2] / "pipeline" / "demo_catalog.toml"


def test_demo_toml_and_json_read_the_same(tmp_path: Path) -> None:
    """The demo TOML catalog parses, and its JSON twin gives the same catalog."""
    catalog = read_catalog(DEMO)
    assert catalog.currency == "EUR"
    assert catalog.items["COLA-33"].price == 150
    twin = tmp_path / "c.json"
    twin.write_text(json.dumps({
        "currency": "EUR",
        "items": {sku: {"price": i.price, "stock": i.stock} for sku, i in catalog.items.items()},
    }))  # fmt: skip
    assert read_catalog(twin) == catalog


@pytest.mark.parametrize(
    "content",
    ['{"items": {"A": {"price": -1}}}', '{"items": {"A": {"prize": 1}}}', "not json", "[]"],
)
def test_invalid_catalogs_are_typed_errors(tmp_path: Path, content: str) -> None:
    """Negative prices, typos and garbage are CatalogError with a reason."""
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CatalogError) as info:
        read_catalog(path)
    assert info.value.reason == "invalid_catalog"


def test_cli_catalog_load_writes_prices_and_stock(redis_url: str) -> None:
    """`order-pipeline catalog load FILE` puts prices and stock levels in Redis and exits 0."""
    argv = ["catalog", "load", str(DEMO), "--redis-url", redis_url]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    with redis.Redis.from_url(redis_url) as client:
        assert client.hget(CATALOG_KEY, "COLA-33") == b"150"
        # Spread over the (default) shards: 1,000,000 units in all.
        parts = [int(client.hget(stock_key(n), "EV-KWH") or 0) for n in range(DEFAULT_SHARDS)]
        assert sum(parts) == 1_000_000
        assert max(parts) - min(parts) <= 1
    assert b'"msg": "catalog_loaded"' in done.stderr


def test_cli_refuses_a_bad_catalog_file(tmp_path: Path) -> None:
    """A broken file exits non-zero with a JSON log line naming it."""
    bad = tmp_path / "bad.toml"
    bad.write_text("items = 3")
    argv = [sys.executable, "-m", "pipeline.cli", "catalog", "load", str(bad)]
    done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert done.returncode == 1
    assert b"invalid_catalog" in done.stderr


async def test_step_chain_is_built_from_names_and_import_paths(aredis: aioredis.Redis) -> None:
    """Registered names and module:factory paths build a chain; unknown names are refused."""
    deps = StepDeps(aredis, Scripts(), PipelineConfig())
    assert {"validate", "reserve", "pay", "fulfil"} <= set(registered())
    chain = build_chain("validate, pipeline.steps:_fulfil", deps)
    assert [step.name for step in chain] == ["validate", "fulfil"]
    with pytest.raises(UnknownStepError):
        build_chain("validate,nope", deps)
    with pytest.raises(UnknownStepError):
        build_chain("validate,validate", deps)


def test_cli_refuses_an_unknown_step_before_starting_anything(redis_url: str) -> None:
    """`order-pipeline --steps validate,nope` exits 1 at once, naming the problem."""
    argv = ["--steps", "validate,nope", "--redis-url", redis_url, "--workers", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert b"unknown_step" in done.stderr
    assert b"worker_process_started" not in done.stderr
