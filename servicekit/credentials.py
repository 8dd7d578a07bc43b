"""Credentials: kept out of argv, read from files, and warned about when missing.

A process's arguments are readable by every local user (``ps``,
``/proc/PID/cmdline``), so no secret belongs in a flag. Each service takes its
passwords from a file (``--mqtt-password-file``, ``--redis-password-file``) or
a variable (``ORDERS_MQTT_PASSWORD``, ``ORDERS_REDIS_PASSWORD``), inserted into
a URL that carries none, or from its TOML file. :func:`secret_flags` finds
the flags that carry one anyway, which ``--production`` refuses and otherwise
:func:`warn_secret_flags` logs.

Production Redis runs with ACL users (``redis-acl/users.acl``); a URL without
a password means the server lets anyone in, or this service will be refused.
Either way an operator must hear about it. The defaults stay password-less so
that the dev stack and the tests run without setup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

import structlog

from .errors import ConfigError

log = structlog.get_logger(__name__)


def redis_url_has_password(url: str) -> bool:
    """True when ``url`` carries a password (``redis://user:password@host``)."""
    return url_has_password(url)


def url_has_password(url: str) -> bool:
    """True when ``url`` (or the URL of a ``NAME=URL`` entry, or any URL of a comma-separated
    list of brokers) carries a password."""
    parts = (url, *url.split(",")) if "," in url else (url,)
    candidates = [c for part in parts for c in (part.strip(), part.partition("=")[2].strip())]
    for candidate in candidates:
        if "://" not in candidate:
            continue
        try:
            if urlsplit(candidate).password:
                return True
        except ValueError:  # not a URL after all (a bracket in the wrong place)
            continue
    return False


def warn_if_redis_unauthenticated(url: str) -> bool:
    """Log a warning when ``url`` has no password; return whether it warned."""
    if redis_url_has_password(url):
        return False
    log.warning(
        "redis_url_without_password",
        redis_url=url,
        hint="production Redis uses ACL users: redis://USER@host:6379/0 with "
        "--redis-password-file (redis-acl/README.md); without a password anyone on the "
        "network can read and change every order",
    )
    return True


def read_secret_file(path: str, setting: str) -> str:
    """The secret held in the file ``path``: its text without the trailing newline.

    Raises:
        ConfigError: reason ``secret_file``: the file cannot be read or holds nothing.
            The message names ``setting`` and the path, never any of the file's text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc}", "secret_file") from exc
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret or "\n" in secret:
        raise ConfigError(f"{setting}: {path} must hold the secret on one line", "secret_file")
    return secret


def one_secret(value: str, path: str, setting: str) -> str:
    """The secret of ``setting``: given itself (``value``) or in the file ``path``, not both.

    Raises:
        ConfigError: reason ``secret_twice`` when both are set, or as :func:`read_secret_file`.
    """
    if value and path:
        raise ConfigError(
            f"{setting} and {setting}_file are both set: give it once", "secret_twice"
        )
    return read_secret_file(path, f"{setting}_file") if path else value


def url_with_password(url: str, password: str, setting: str) -> str:
    """``url`` with ``password`` (percent-encoded) in its user info; ``url`` if it is empty.

    Raises:
        ConfigError: reason ``password_twice``: ``url`` already holds a password.
    """
    if not password:
        return url
    if url_has_password(url):
        raise ConfigError(
            f"{setting} holds a password and a password file gives another: give it once, "
            "in the file",
            "password_twice",
        )
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def urls_with_password(spec: str, password: str, setting: str) -> str:
    """Comma-separated URLs (several brokers), each given ``password``; ``spec`` if it is empty.

    Raises:
        ConfigError: reason ``password_twice``: a URL already holds a password.
    """
    if not password:
        return spec
    return ",".join(url_with_password(part.strip(), password, setting) for part in spec.split(","))


def entries_with_password(entries: Iterable[str], password: str) -> tuple[str, ...]:
    """``NAME=URL`` entries, each URL without a password of its own given ``password``."""
    return tuple(
        entry if url_has_password(entry) else f"{name}={url_with_password(url, password, name)}"
        for entry in entries
        for name, _, url in [entry.partition("=")]
    )


def secret_flags(flags: Mapping[str, object], secrets: Iterable[str]) -> list[str]:
    """The flags in ``flags`` (argparse dests → values) that carry a secret.

    A flag carries one when it is a setting named in ``secrets`` and was given,
    or when any value it was given is a URL (or ``NAME=URL``) with a password.
    """
    secret_names = set(secrets)
    found = []
    for name, value in flags.items():
        values = value if isinstance(value, list | tuple) else [value]
        given = [v for v in values if isinstance(v, str)]
        if (name in secret_names and any(given)) or any(url_has_password(v) for v in given):
            found.append("--" + name.replace("_", "-"))
    return sorted(found)


def secret_flags_error(flags: list[str]) -> str:
    """Why ``--production`` refuses ``flags``, and what to do instead (no secret in it)."""
    return (
        f"{', '.join(flags)} carry a secret on the command line, where every local user can "
        "read it (ps, /proc/PID/cmdline); under --production give passwords with "
        "--mqtt-password-file / --redis-password-file (a URL without the password), tokens "
        "with their *-file flag, or put them in the ORDERS_* variable or the TOML file"
    )


def warn_secret_flags(flags: list[str]) -> bool:
    """Log one warning naming ``flags`` (never their values); return whether it warned."""
    if not flags:
        return False
    log.warning(
        "secret_in_argv",
        flags=flags,
        hint="every local user can read a process's arguments; use the password-file flags "
        "or the ORDERS_* variables (--production refuses this)",
    )
    return True
