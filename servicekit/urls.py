"""Connection URLs: ``mqtt://user:pass@host:1883`` and ``mqtts://`` for TLS.

Redis URLs (``redis://``, ``rediss://``) are parsed by redis-py itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

_DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttUrl:
    """A parsed MQTT URL. The password never appears in ``repr``/``str``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> MqttUrl:
        """Parse ``mqtt[s]://[user[:pass]@]host[:port]``.

        Raises:
            ConfigError: reason ``invalid_url`` for anything else.
        """
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"scheme must be mqtt or mqtts: {redact(url)}", reason="invalid_url")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ConfigError(f"bad port in {redact(url)}", reason="invalid_url") from exc
        if not parts.hostname:
            raise ConfigError(f"no host in {redact(url)}", reason="invalid_url")
        return cls(
            host=parts.hostname,
            port=port,
            tls=parts.scheme == "mqtts",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def ssl_context(self, ca_file: str = "") -> ssl.SSLContext | None:
        """A verifying TLS context for ``mqtts://`` (None for ``mqtt://``).

        Args:
            ca_file: the CA bundle that signed the broker's certificate; empty
                means the system's trust store.
        """
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=ca_file or None)

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_mqtt_urls(spec: str) -> tuple[MqttUrl, ...]:
    """Comma-separated MQTT URLs (several brokers of one region), in their order.

    Raises:
        ConfigError: reason ``invalid_url``: a bad URL, a broker given twice, or none.
    """
    urls = tuple(MqttUrl.parse(part.strip()) for part in spec.split(",") if part.strip())
    if not urls:
        raise ConfigError("no broker URL given", reason="invalid_url")
    if len(set(urls)) < len(urls):
        raise ConfigError("a broker URL is given twice", reason="invalid_url")
    return urls


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
