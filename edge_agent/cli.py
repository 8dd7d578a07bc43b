"""``edge-agent``: run the device agent; ``submit`` an order or ``retry`` held ones from a shell.

Exit codes of the agent: 0 after SIGTERM/SIGINT, 1 failed to start, 70 a
background loop died (see ``agent.py``: systemd restarts it). Of ``submit``:
0 queued, 2 bad input, 3 refused (full, disk, shutting down), 4 agent
unreachable. Of ``retry``: 0 every order re-queued, 2 usage, 3 some refused
(not held, unknown, past the dedup horizon), 4 agent unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import structlog

from servicekit import tracing
from servicekit.config import (
    ConfigError,
    add_config_arguments,
    field_help,
    load_config,
    secret_flags_given,
)
from servicekit.credentials import read_secret_file, warn_secret_flags
from servicekit.logs import configure_logging
from servicekit.version import add_version_argument

from .agent import EdgeAgent
from .config import AgentConfig
from .errors import AgentError, BackgroundLoopDied

log = structlog.get_logger(__name__)

EXIT_LOOP_DIED = 70  # EX_SOFTWARE: an internal error; the service manager restarts us


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="The device agent: durable outbox, MQTT publisher, localhost intake. "
        "`edge-agent submit --help` sends an order to a running agent; "
        "`edge-agent retry --help` re-queues held orders.",
        conflict_handler="resolve",  # --region below replaces the generated one-value flag
    )
    add_version_argument(parser)
    add_config_arguments(parser, AgentConfig)
    parser.add_argument(
        "--region",
        dest="region",
        action="append",
        default=None,
        metavar="NAME=MQTT_URL",
        help=field_help(AgentConfig, "region"),
    )
    parsed = parser.parse_args(args)
    try:
        config = load_config(AgentConfig, parsed)
        config.validate()
    except ConfigError as exc:
        print(f"edge-agent: {exc.detail}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, service="edge-agent")
    warn_secret_flags(secret_flags_given(AgentConfig, parsed))
    tracing.configure(
        config.otlp_endpoint, sample_ratio=config.trace_sample_ratio, service_name="edge-agent",
        attributes={"service.instance.id": config.device_id},
    )  # fmt: skip
    try:
        asyncio.run(serve(config))
    except BackgroundLoopDied as exc:
        log.critical("agent_exiting", reason=exc.reason, loop=exc.loop, detail=exc.detail)
        return EXIT_LOOP_DIED
    except AgentError as exc:
        log.error("agent_failed_to_start", reason=exc.reason, detail=exc.detail)  # noqa: TRY400
        return 1
    finally:
        tracing.shutdown()  # export the spans still buffered
    return 0


async def serve(config: AgentConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with EdgeAgent(config) as agent:
        log.info(
            "agent_started",
            db=config.db,
            http_port=agent.http_port,
            mqtt_url=str(agent.publisher.url),
            regions=[f"{r.name}={url}" for r in config.regions for url in r.urls],
        )
        release_startup_memory()
        await stop.wait()
        log.info("agent_stopping")


def release_startup_memory() -> None:
    """Give the heap that imports left free back to the OS (glibc only; else a no-op).

    Importing aiohttp, paho, msgspec and structlog frees about 5 MB of
    temporaries that glibc keeps mapped, scattered below live objects;
    ``malloc_trim(0)`` returns those pages. Measured idle RSS: docs/explanation/benchmarks.md.
    """
    try:
        import ctypes  # noqa: PLC0415 - only here, once

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def submit_main(argv: Sequence[str]) -> int:
    """``edge-agent submit ORDER_JSON``: POST one order to the local agent."""
    parser = argparse.ArgumentParser(
        prog="edge-agent submit",
        description="Send one order (JSON, or - for stdin) to a running agent's intake.",
    )
    parser.add_argument(
        "order",
        help='the order as a JSON object, e.g. \'{"currency":"EUR",...}\', or - to read it '
        "from stdin",
    )
    _add_agent_arguments(parser)
    args = parser.parse_args(argv)
    try:
        token = _token(args)
    except ConfigError as exc:
        print(f"edge-agent submit: {exc.detail}", file=sys.stderr)
        return 2
    body = sys.stdin.read() if args.order == "-" else args.order
    request = urllib.request.Request(
        f"http://{args.host}:{args.http_port}/v1/orders",
        data=body.encode(),
        headers=_json_headers(token),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(detail, file=sys.stderr)
        return 2 if exc.code in (400, 422) else 3
    except (urllib.error.URLError, OSError) as exc:
        print(json.dumps({"error": "agent_unreachable", "detail": str(exc)}), file=sys.stderr)
        return 4


def _add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """How ``submit`` and ``retry`` reach the local agent's intake."""
    parser.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="TCP port of the agent's intake; set it to the agent's http_port if changed "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the agent's intake; change it only for an agent whose http_host is "
        "not loopback (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the agent's answer before giving up with exit code 4 "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("ORDERS_HTTP_TOKEN", ""),
        help="bearer token the agent's intake requires, if its http_token is set; prefer the "
        "variable or --token-file, as a flag every local user can read it "
        "(env ORDERS_HTTP_TOKEN; default empty)",
    )
    parser.add_argument(
        "--token-file",
        default="",
        help="file holding that bearer token on one line, read instead of --token (default none)",
    )


def _token(args: argparse.Namespace) -> str:
    """The intake's bearer token: from --token-file when given, else --token or the variable.

    Raises:
        ConfigError: the token file cannot be read.
    """
    return read_secret_file(args.token_file, "--token-file") if args.token_file else args.token


def _json_headers(token: str) -> dict[str, str]:
    """The intake takes application/json only (no cross-origin form posts), and the token."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def retry_main(argv: Sequence[str]) -> int:
    """``edge-agent retry [--held] [ORDER_ID…]``: re-queue held orders on the local agent."""
    parser = argparse.ArgumentParser(
        prog="edge-agent retry",
        description="Re-queue orders the broker refused for good (state `held`), "
        "once the cause (ACL, limits) is fixed.",
    )
    parser.add_argument(
        "order_ids",
        nargs="*",
        metavar="ORDER_ID",
        help="ids of the held orders to re-queue (or give --held instead)",
    )
    parser.add_argument(
        "--held",
        action="store_true",
        help="re-queue every held order instead of naming them, once the cause is fixed",
    )
    _add_agent_arguments(parser)
    args = parser.parse_args(argv)
    if args.held == bool(args.order_ids):
        parser.print_usage(sys.stderr)
        print("edge-agent retry: give --held or ORDER_IDs (not both)", file=sys.stderr)
        return 2
    try:
        token = _token(args)
    except ConfigError as exc:
        print(f"edge-agent retry: {exc.detail}", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.http_port}/v1/orders"
    paths = ["/retry-held"] if args.held else [f"/{oid}/retry" for oid in args.order_ids]
    worst = 0
    for path in paths:
        request = urllib.request.Request(
            base + path, data=b"{}", headers=_json_headers(token), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=args.timeout) as response:
                body = json.loads(response.read())
                print(json.dumps(body))
                if body.get("past_horizon") or body.get("not_held"):
                    worst = max(worst, 3)
        except urllib.error.HTTPError as exc:
            print(exc.read().decode(errors="replace"), file=sys.stderr)
            worst = max(worst, 3)
        except (urllib.error.URLError, OSError) as exc:
            print(json.dumps({"error": "agent_unreachable", "detail": str(exc)}), file=sys.stderr)
            return 4
    return worst


# Subcommands dispatched before the agent's own parser (scripts/cli_reference.py reads this).
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "submit": submit_main,
    "retry": retry_main,
}

if __name__ == "__main__":
    sys.exit(main())
