"""Orders API access: bearer tokens with roles, no CORS, no unprotected bind off loopback."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pipeline.api import create_app
from pipeline.api_tokens import (
    TokenStore,
    digest_line,
    load_api_tokens,
    new_token,
    parse_entries,
    token_digest,
)
from pipeline.config import PipelineConfig
from pipeline.errors import TokenConfigError
from testrig.servers import free_port
from testrig.services import http_ok
from tests.helpers import raw_http, wait_until_blocking

from .conftest import TEST_SHARDS
from .processes import env_for, spawn, stop_all

READ_TOKEN = new_token()
OPERATE_TOKEN = new_token()
ENTRIES = "\n".join(
    [digest_line(READ_TOKEN, "read", "grafana"), digest_line(OPERATE_TOKEN, "operate", "alice")]
)


@contextlib.asynccontextmanager
async def secured(
    client: aioredis.Redis,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The API with one read and one operate token."""
    tokens = TokenStore(parse_entries(ENTRIES, source="test"))
    async with TestClient(
        TestServer(create_app(client, shards=TEST_SHARDS, tokens=tokens))
    ) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


async def test_reads_need_a_token_and_replay_needs_operate(aredis: aioredis.Redis) -> None:
    """No token: 401 with WWW-Authenticate; read token: reads only (replay 403); operate: both."""
    async with secured(aredis) as http:
        for path in ("/v1/dlq", "/v1/orders/order-00000001", "/metrics"):
            refused = await http.get(path)
            assert refused.status == 401, path
            assert refused.content_type == "application/problem+json"
            assert refused.headers["WWW-Authenticate"] == 'Bearer realm="orders-api"'
            assert (await refused.json())["code"] == "unauthorized"
        wrong = await http.get("/v1/dlq", headers=bearer(new_token()))
        assert wrong.status == 401
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        assert (await http.get("/v1/dlq", headers={"Authorization": READ_TOKEN})).status == 401
        assert (await http.get("/v1/dlq", headers=bearer(READ_TOKEN))).status == 200
        forbidden = await http.post("/v1/dlq/1-1/replay", headers=bearer(READ_TOKEN))
        assert forbidden.status == 403
        assert (await forbidden.json())["required_role"] == "operate"
        # The operate token gets past auth to the handler: an unknown entry is a 404.
        missing = await http.post("/v1/dlq/1-1/replay", headers=bearer(OPERATE_TOKEN))
        assert missing.status == 404
        assert (await missing.json())["code"] == "dlq-entry-not-found"
        assert (await http.get("/v1/dlq", headers=bearer(OPERATE_TOKEN))).status == 200
        assert (await http.post("/v1/dlq/1-1/replay")).status == 401
        # Liveness and the document stay open.
        assert (await http.get("/healthz")).status == 200
        assert (await http.get("/openapi.json")).status == 200


async def test_no_cors_a_preflight_gets_nothing(aredis: aioredis.Redis) -> None:
    """An OPTIONS preflight from a web page is a 401 problem (a preflight carries no token)
    without any Access-Control header; on a loopback API without tokens it is a 405."""
    ask = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with TestClient(TestServer(create_app(aredis, shards=TEST_SHARDS))) as open_api:
        preflight = await open_api.options("/v1/dlq/1-1/replay", headers=ask)
        assert (preflight.status, preflight.content_type) == (405, "application/problem+json")
        assert not any(h.lower().startswith("access-control-") for h in preflight.headers)
    async with secured(aredis) as http:
        preflight = await http.options("/v1/dlq/1-1/replay", headers=ask)
        assert preflight.status == 401
        assert preflight.content_type == "application/problem+json"
        assert not any(h.lower().startswith("access-control-") for h in preflight.headers)
        read = await http.get(
            "/v1/dlq", headers={**bearer(READ_TOKEN), "Origin": "https://evil.example"}
        )
        assert read.status == 200
        assert "Access-Control-Allow-Origin" not in read.headers


def test_tokens_are_stored_hashed_and_parsed_strictly(tmp_path: Path) -> None:
    """Only the SHA-256 is stored; a malformed entry is a loud error naming its line."""
    line = digest_line(OPERATE_TOKEN, "operate", "alice")
    assert OPERATE_TOKEN not in line
    assert line == f"operate sha256:{token_digest(OPERATE_TOKEN).hex()} alice"
    store = TokenStore(parse_entries(f"# comment\n\n{line}\n", source="f"))
    entry = store.lookup(OPERATE_TOKEN)
    assert entry is not None
    assert (entry.role, entry.name) == ("operate", "alice")
    assert store.lookup(READ_TOKEN) is None
    assert store.authenticate(f"Bearer {OPERATE_TOKEN}\n") is None  # full match only
    for bad in ("admin sha256:" + "0" * 64, "read sha256:abc", "read md5:" + "0" * 64, "read"):
        with pytest.raises(TokenConfigError, match="entry 1"):
            parse_entries(bad, source="f")


def test_a_non_loopback_bind_without_tokens_is_refused(tmp_path: Path) -> None:
    """0.0.0.0 without tokens raises; a tokens file or env entries load; loopback is open."""
    with pytest.raises(TokenConfigError, match="not loopback"):
        load_api_tokens(PipelineConfig(http_host="0.0.0.0"))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert not load_api_tokens(PipelineConfig(http_host=host))
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(ENTRIES + "\n")
    assert (
        len(load_api_tokens(PipelineConfig(http_host="0.0.0.0", api_tokens_file=str(tokens_file))))
        == 2
    )
    env_entries = digest_line(READ_TOKEN, "read") + ";" + digest_line(OPERATE_TOKEN, "operate")
    assert len(load_api_tokens(PipelineConfig(http_host="::", api_tokens=env_entries))) == 2
    with pytest.raises(TokenConfigError, match="tokens_unreadable"):
        load_api_tokens(PipelineConfig(api_tokens_file=str(tmp_path / "missing")))


def _pipeline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_token_new_cli_and_the_service_refusing_to_start(tmp_path: Path, redis_url: str) -> None:
    """`token new` prints the token once, stores only its hash; tokenless `run` on 0.0.0.0 fails."""
    tokens_file = tmp_path / "tokens"
    minted = _pipeline(
        "token", "new", "--role", "operate", "--name", "ops", "--tokens-file", str(tokens_file)
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.startswith("iotp_")
    assert len(token) >= 40
    stored = tokens_file.read_text()
    assert token not in stored
    assert TokenStore(parse_entries(stored, source="f")).lookup(token) is not None
    assert tokens_file.stat().st_mode & 0o777 == 0o644  # digests only: a container must read it
    port = str(free_port())
    refused = _pipeline(
        "run",
        "--redis-url",
        redis_url,
        "--workers",
        "0",
        "--http-host",
        "0.0.0.0",
        "--http-port",
        port,
    )
    assert refused.returncode == 1
    assert "tokens_required" in refused.stderr + refused.stdout


def test_compose_gives_the_published_api_a_tokens_file() -> None:
    """docker-compose binds the API to 0.0.0.0 only with a tokens file, published on loopback."""
    compose = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())
    assert compose["secrets"]["orders-api-tokens"]["file"] == "./secrets/orders-api-tokens"
    for name in ("pipeline", "pipeline-secure"):  # the dev and the secure profile's
        pipeline = compose["services"][name]
        env = pipeline["environment"]
        assert env["ORDERS_HTTP_HOST"] == "0.0.0.0", name
        assert env["ORDERS_API_TOKENS_FILE"] == "/run/secrets/orders-api-tokens", name
        assert pipeline["secrets"] == ["orders-api-tokens"], name
        assert all(port.startswith("127.0.0.1:") for port in pipeline["ports"]), name
        # The shared settings still reach the pipeline through the merged anchor.
        assert "redis://" in env["ORDERS_REDIS_URL"], name


def test_unparsable_requests_to_the_real_api_are_problems_without_the_token(
    tmp_path: Path, redis_url: str
) -> None:
    """The real `order-pipeline run`: a header over aiohttp's limit holding a valid operate
    token, and a malformed header line, are 400 problems (aiohttp's text/plain 400 quoted
    the token and logged it at error level); the token is in no body and not in the
    process's log."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(ENTRIES + "\n")
    port = free_port()
    log = tmp_path / "pipeline.log"
    config = PipelineConfig(
        redis_url=redis_url, http_port=port, workers=0, shards=TEST_SHARDS,
        api_tokens_file=str(tokens_file),
    )  # fmt: skip
    process = spawn(["run"], env_for(config), log)
    requests = [
        b"GET /v1/dlq HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + OPERATE_TOKEN.encode() + b"x" * 9000 + b"\r\n\r\n",
        b"GET /v1/dlq HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization Bearer "
        + OPERATE_TOKEN.encode() + b"\r\n\r\n",
    ]  # fmt: skip
    try:
        wait_until_blocking(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, "the API")
        answers = [raw_http(port, request) for request in requests]
        wait_until_blocking(
            lambda: log.read_text().count("http_bad_request") == 2, 10, "two warnings"
        )
    finally:
        stop_all([process])
    for status, content_type, body in answers:
        assert (status, content_type.split(";")[0]) == (400, "application/problem+json")
        assert body["code"] == "bad-request"
        assert OPERATE_TOKEN not in json.dumps(body)
    assert OPERATE_TOKEN not in log.read_text()
