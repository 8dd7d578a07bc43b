"""Mosquitto password files (``$7$`` PBKDF2-SHA512 entries, as ``mosquitto_passwd`` writes).

Written in Python so that enrolling thousands of devices needs no subprocess
per device; a test checks that a real Mosquitto accepts the entries.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

ITERATIONS = 101  # mosquitto_passwd's default for $7$
SALT_BYTES = 12


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The ``$7$101$salt$hash`` string Mosquitto 2.x verifies."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def read_passwd(path: Path) -> dict[str, str]:
    """``username → hash`` entries of a password file (missing file: empty)."""
    if not path.exists():
        return {}
    entries = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            user, _, hashed = line.partition(":")
            entries[user] = hashed
    return entries


def write_passwd(path: Path, entries: dict[str, str]) -> None:
    """Replace the password file atomically (readers never see half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text("".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items())))
    tmp.replace(path)
