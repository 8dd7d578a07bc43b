"""Operator bearer tokens of the orders API: roles, hashed storage, checking.

A token is ``iotp_`` + 43 URL-safe characters (256 random bits). Only its
SHA-256 is stored, one entry per line, in a tokens file or the environment::

    # role     digest                                                             name
    operate    sha256:3f5a…(64 hex)                                               alice
    read       sha256:9b1c…                                                       grafana

Roles: ``read`` (orders, DLQ listing, metrics) and ``operate`` (everything
``read`` may, plus DLQ replay and resolve). A plain SHA-256 suffices because
the tokens carry 256 bits of entropy: there is nothing to brute-force, so a
slow password hash would buy nothing, and the file of digests is no secret
(a digest cannot be turned back into its token). Digests are compared in constant time,
against every entry, whichever matches.

No tokens configured means no authentication, which is allowed only on a
loopback bind: :func:`load_api_tokens` refuses any other host without them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .config import PipelineConfig
from .errors import TokenConfigError

Role = Literal["read", "operate"]
ROLES: Final[tuple[Role, ...]] = ("read", "operate")
TOKEN_PREFIX: Final = "iotp_"
_DIGEST_RE: Final = re.compile(r"sha256:([0-9a-f]{64})")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
# A bearer token as RFC 6750 §2.1 allows it (b64token), bounded.
_BEARER_RE: Final = re.compile(r"Bearer +([A-Za-z0-9._~+/-]{1,256}=*)", re.IGNORECASE)
_LOOPBACK_NAMES: Final = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One stored token: its role, its SHA-256 and a name for the logs."""

    role: Role
    digest: bytes
    name: str


def new_token() -> str:
    """A fresh token (256 random bits); show it once, store only :func:`digest_line`."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    """SHA-256 of a token."""
    return hashlib.sha256(token.encode()).digest()


def digest_line(token: str, role: Role, name: str = "") -> str:
    """The line to store for ``token``: ``role sha256:hex [name]``."""
    return f"{role} sha256:{token_digest(token).hex()} {name}".rstrip()


def valid_name(name: str) -> bool:
    """A token's name: 1-64 of ``A-Z a-z 0-9 _ . @ -``."""
    return bool(_NAME_RE.fullmatch(name))


def parse_entries(text: str, *, source: str) -> list[TokenEntry]:
    """Parse stored entries: one per line (or per ``;`` in an env var), ``#`` comments.

    Raises:
        TokenConfigError: a line is not ``role sha256:<64 hex> [name]``.
    """
    entries = []
    for number, raw in enumerate(re.split(r"[\n;]", text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        digest = _DIGEST_RE.fullmatch(parts[1]) if len(parts) in (2, 3) else None
        name = parts[2] if len(parts) == 3 else ""
        if parts[0] not in ROLES or digest is None or (name and not valid_name(name)):
            raise TokenConfigError(
                "bad_token_entry",
                f"{source} entry {number}: expected 'read|operate sha256:<64 hex> [name]'",
            )
        role: Role = "operate" if parts[0] == "operate" else "read"
        entries.append(TokenEntry(role, bytes.fromhex(digest.group(1)), name))
    return entries


class TokenStore:
    """The configured tokens; answers which role a presented token holds."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry of ``token``, or None; constant time in which entry matches."""
        presented = token_digest(token)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry
        return found

    def authenticate(self, authorization: str | None) -> TokenEntry | None:
        """The entry of an ``Authorization: Bearer …`` header value, or None."""
        if authorization is None:
            return None
        match = _BEARER_RE.fullmatch(authorization)
        return self.lookup(match.group(1)) if match else None


def allows(entry: TokenEntry, needed: Role) -> bool:
    """``operate`` may do everything ``read`` may."""
    return entry.role == "operate" or needed == "read"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_api_tokens(config: PipelineConfig) -> TokenStore:
    """The tokens from ``api_tokens_file`` and ``api_tokens``, checked against the bind.

    Raises:
        TokenConfigError: an unreadable file or bad entry, or a non-loopback
            ``http_host`` with no tokens at all.
    """
    entries: list[TokenEntry] = []
    if config.api_tokens_file:
        path = Path(config.api_tokens_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TokenConfigError("tokens_unreadable", f"{path}: {exc.strerror}") from exc
        entries += parse_entries(text, source=str(path))
    if config.api_tokens:
        entries += parse_entries(config.api_tokens, source="ORDERS_API_TOKENS")
    if not entries and not is_loopback(config.http_host):
        raise TokenConfigError(
            "tokens_required",
            f"http_host {config.http_host!r} is not loopback and no API tokens are configured; "
            "mint one with `order-pipeline token new --role read` and set api_tokens_file",
        )
    return TokenStore(entries)


def write_entry(path: Path, line: str) -> None:
    """Append ``line`` to a tokens file (created 0644: it holds digests, no secret).

    World-readable on purpose: a container's user must read a file mounted
    from the host, and a digest of a 256-bit token reveals nothing usable.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with os.fdopen(fd, "a") as out:
        out.write(line + "\n")
