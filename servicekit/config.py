"""Settings for every service: flags > ``ORDERS_*`` environment > TOML file.

Each service declares one frozen :class:`ServiceConfig` subclass. Its fields
become ``--kebab-case`` flags and ``ORDERS_UPPER_CASE`` variables; the TOML
file (``--config`` or ``ORDERS_CONFIG``) uses the field names as keys. Only
entrypoints call :func:`load_config`; components get the frozen object passed in.

A field typed ``tuple[str, ...]`` is a repeatable flag (``--region-redis a=… --region-redis
b=…``), a comma-separated variable (``ORDERS_REGION_REDIS=a=…,b=…``) and a TOML array.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from .errors import ConfigError

__all__ = ["ConfigError", "ServiceConfig", "add_config_arguments", "load_config"]

ENV_PREFIX = "ORDERS_"

C = TypeVar("C", bound="ServiceConfig")


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every service's settings."""

    log_level: str = "info"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> None:
    """Add ``--config`` and one flag per field of ``cls`` to ``parser``.

    Flags default to None so that an absent flag never hides the environment
    or the file.
    """
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    for field in msgspec.structs.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = None if field.default is msgspec.NODEFAULT else field.default
        help_text = f"(env {ENV_PREFIX}{field.name.upper()}; default {default!r})"
        if _is_repeatable(field.type):
            parser.add_argument(
                flag, dest=field.name, action="append", default=None, help=help_text + " repeatable"
            )
        elif field.type is bool:
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
    try:
        # strict=False lets "5" from a flag or variable become the int 5.
        return msgspec.convert(merged, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from exc


def _is_repeatable(annotation: Any) -> bool:
    """A ``tuple[str, ...]`` field: one flag per value."""
    return typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...)


def _split(value: str) -> list[str]:
    """A comma-separated variable's values (blanks dropped)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
