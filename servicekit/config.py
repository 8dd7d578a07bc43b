"""Settings for every service: flags > ``ORDERS_*`` environment > TOML file.

Each service declares one frozen :class:`ServiceConfig` subclass. Its fields
become ``--kebab-case`` flags and ``ORDERS_UPPER_CASE`` variables; the TOML
file (``--config`` or ``ORDERS_CONFIG``) uses the field names as keys. Only
entrypoints call :func:`load_config`; components get the frozen object passed in.

A field typed ``tuple[str, ...]`` is a repeatable flag (``--region-redis a=… --region-redis
b=…``), a comma-separated variable (``ORDERS_REGION_REDIS=a=…,b=…``) and a TOML array.

A field's help is written once, beside it: ``Annotated[float, doc("…")]``. ``--help`` and
the CLI reference page (scripts/cli_reference.py) show it followed by the facts the code
knows, e.g. ``(env ORDERS_BATCH_DELAY_MS; TOML batch_delay_ms; default 5.0)``.

Secrets stay out of argv (servicekit.credentials): a field marked ``doc(…, secret=True)``,
or a URL with a password, given as a flag is refused under ``production`` and warned
about otherwise; :meth:`ServiceConfig.with_secret_files` reads the ``*_file`` settings.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

import msgspec

from .credentials import secret_flags, secret_flags_error
from .errors import ConfigError

__all__ = [
    "ConfigError",
    "MqttCaFile",
    "MqttPassword",
    "MqttPasswordFile",
    "OtlpEndpoint",
    "RedisCluster",
    "RedisPassword",
    "RedisSentinel",
    "RedisSentinelMaster",
    "ServiceConfig",
    "TraceSampleRatio",
    "add_config_arguments",
    "doc",
    "field_help",
    "load_config",
    "secret_flags_given",
]

ENV_PREFIX = "ORDERS_"

C = TypeVar("C", bound="ServiceConfig")


def doc(text: str, *, default: str = "", secret: bool = False) -> msgspec.Meta:
    """A setting's help: what it does and when to change it, with its unit, in one line.

    Args:
        text: the help, shown by ``--help`` and on the CLI reference page.
        default: how to show a default computed at start (``default_factory``).
        secret: the value is a secret: as a flag it is refused under ``production``
            and warned about otherwise (give it by variable, TOML or a ``*_file`` setting).
    """
    extra: dict[str, Any] = {"default": default} if default else {}
    if secret:
        extra["secret"] = True
    return msgspec.Meta(description=text, extra=extra or None)


# Settings several services spell the same way: one definition each, help text included.
MqttPassword = Annotated[
    str,
    doc(
        "Broker password of --mqtt-url's user, for the ORDERS_MQTT_PASSWORD variable or "
        "the TOML file (as a flag every local user can read it); or use --mqtt-password-file",
        secret=True,
    ),
]
MqttPasswordFile = Annotated[
    str,
    doc(
        "File holding the broker password of --mqtt-url's user on one line (keep it 0600); "
        "set it whenever the broker wants a password, never put one in the URL flag"
    ),
]
MqttCaFile = Annotated[
    str,
    doc(
        "PEM CA bundle that verifies an mqtts:// broker; set it when the broker's "
        "certificate comes from a private CA, empty uses the system's CAs"
    ),
]
RedisPassword = Annotated[
    str,
    doc(
        "Redis password of --redis-url's user, for the ORDERS_REDIS_PASSWORD variable or "
        "the TOML file (as a flag every local user can read it); or use "
        "--redis-password-file",
        secret=True,
    ),
]
RedisCluster = Annotated[
    bool,
    doc(
        "Talk to --redis-url as a Redis Cluster (keys are hash-tagged per shard either "
        "way); turn on when Redis runs as a cluster"
    ),
]
RedisSentinel = Annotated[
    tuple[str, ...],
    doc(
        "Redis Sentinel as HOST:PORT, one per Sentinel; with --redis-sentinel-master the "
        "master is looked up there on every new connection, so a promotion needs no restart "
        "(--redis-url then gives only user, password, db and TLS)"
    ),
]
RedisSentinelMaster = Annotated[
    str,
    doc(
        "Name of the master group the --redis-sentinel Sentinels monitor (their `sentinel "
        "monitor NAME …` line); required with --redis-sentinel"
    ),
]
OtlpEndpoint = Annotated[
    str,
    doc(
        "OTLP/HTTP collector that receives traces, e.g. http://127.0.0.1:4318 (/v1/traces "
        "is added); empty turns tracing off"
    ),
]
TraceSampleRatio = Annotated[
    float,
    msgspec.Meta(ge=0, le=1),
    doc(
        "Fraction 0..1 of traces recorded when tracing is on; lower it to cut tracing cost "
        "under heavy load"
    ),
]


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every service's settings."""

    log_level: Annotated[
        str,
        doc(
            "Least severe level written to the JSON log on stderr: debug, info, warning or "
            "error; debug while chasing a problem, warning to quieten a busy host"
        ),
    ] = "info"
    production: Annotated[
        bool,
        doc(
            "Refuse to start with a secret on the command line (a password inside a URL flag, "
            "a token flag), which every local user can read with ps; turn it on in every "
            "deployment, off it is only warned about"
        ),
    ] = False

    def with_secret_files(self) -> Self:
        """These settings with each ``*_file`` secret read in (:func:`load_config` calls it).

        Raises:
            ConfigError: a secret file cannot be read, or a secret is given twice.
        """
        return self


def field_help(cls: type[ServiceConfig], name: str) -> str:
    """The ``--help`` line of one field: its :func:`doc` text, then env, TOML key and default.

    Raises:
        KeyError: ``cls`` has no field ``name``.
    """
    field = {field.name: field for field in msgspec.structs.fields(cls)}[name]
    text, shown_default = _doc(field.type)
    facts = []
    repeatable = _is_repeatable(field.type)
    if repeatable:
        facts.append("repeatable")
    env = f"env {ENV_PREFIX}{field.name.upper()}"
    facts.append(env + (", comma-separated" if repeatable else ""))
    facts.append(f"TOML {field.name}")
    if shown_default:
        facts.append(f"default {shown_default}")
    elif field.default is not msgspec.NODEFAULT:
        facts.append(f"default {msgspec.json.encode(field.default).decode()}")
    elif field.default_factory is msgspec.NODEFAULT:
        facts.append("required")
    suffix = f"({'; '.join(facts)})"
    return f"{text} {suffix}" if text else suffix


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> None:
    """Add ``--config`` and one flag per field of ``cls`` to ``parser``.

    Flags default to None so that an absent flag never hides the environment
    or the file.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file of settings whose keys are the field names below; environment variables "
        f"and flags override it (env {ENV_PREFIX}CONFIG; default none)",
    )
    for field in msgspec.structs.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        # argparse %-formats help: a literal % in the text must be doubled.
        help_text = field_help(cls, field.name).replace("%", "%%")
        if _is_repeatable(field.type):
            parser.add_argument(
                flag, dest=field.name, action="append", default=None, help=help_text
            )
        elif _bare(field.type) is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=help_text)


def load_config(
    cls: type[C],
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` from the TOML file, then the environment, then the flags.

    Raises:
        ConfigError: the merged settings do not fit ``cls``, or the file is bad.
    """
    merged = _merged(cls, args, env)
    try:
        # strict=False lets "5" from a flag or variable become the int 5.
        config = msgspec.convert(merged, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from exc
    if config.production and (leaked := secret_flags_given(cls, args)):
        raise ConfigError(secret_flags_error(leaked), "secret_in_argv")
    return config.with_secret_files()


def given_fields(
    cls: type[ServiceConfig],
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
) -> frozenset[str]:
    """The settings given explicitly (file, environment or flag), not left at their default.

    Raises:
        ConfigError: the TOML file is bad.
    """
    return frozenset(_merged(cls, args, env))


def _merged(
    cls: type[ServiceConfig],
    args: argparse.Namespace | None,
    env: Mapping[str, str] | None,
) -> dict[str, Any]:
    env = os.environ if env is None else env
    flags = vars(args) if args is not None else {}
    names = [field.name for field in msgspec.structs.fields(cls)]

    path = flags.get("config") or env.get(f"{ENV_PREFIX}CONFIG")
    merged: dict[str, Any] = _read_toml(Path(path)) if path else {}
    repeatable = {field.name for field in msgspec.structs.fields(cls) if _is_repeatable(field.type)}
    merged.update(
        {
            name: _split(env[key]) if name in repeatable else env[key]
            for name in names
            if (key := f"{ENV_PREFIX}{name.upper()}") in env
        }
    )
    merged.update({name: flags[name] for name in names if flags.get(name) is not None})
    return merged


def secret_flags_given(cls: type[ServiceConfig], args: argparse.Namespace | None) -> list[str]:
    """The flags in ``args`` that carry a secret (see servicekit.credentials), sorted."""
    if args is None:
        return []
    names = {field.name for field in msgspec.structs.fields(cls)}
    flags = {name: value for name, value in vars(args).items() if name in names}
    secrets = [
        field.name
        for field in msgspec.structs.fields(cls)
        if (_meta(field.type).extra or {}).get("secret")
    ]
    return secret_flags(flags, secrets)


def _bare(annotation: Any) -> Any:
    """The type under any ``Annotated[…]`` layers."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _meta(annotation: Any) -> msgspec.Meta:
    """The :func:`doc` metadata in a field's annotation (an empty Meta if none)."""
    if typing.get_origin(annotation) is Annotated:
        for meta in typing.get_args(annotation)[1:]:
            if isinstance(meta, msgspec.Meta) and meta.description:
                return meta
    return msgspec.Meta()


def _doc(annotation: Any) -> tuple[str, str]:
    """The :func:`doc` text and shown default in a field's annotation (empty if none)."""
    meta = _meta(annotation)
    return meta.description or "", (meta.extra or {}).get("default", "")


def _is_repeatable(annotation: Any) -> bool:
    """A ``tuple[str, ...]`` field: one flag per value."""
    bare = _bare(annotation)
    return typing.get_origin(bare) is tuple and typing.get_args(bare) == (str, ...)


def _split(value: str) -> list[str]:
    """A comma-separated variable's values (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
