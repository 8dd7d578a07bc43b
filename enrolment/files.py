"""Writing registry files with the right mode every time, atomically.

``Path.touch(mode=…)`` sets a mode only when it creates the file: rewriting an
existing 0644 file through it keeps 0644. Every write here goes to a fresh
temporary file created with the final mode, then replaces the target, so a
re-enrolment resets modes and a reader never sees half a file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Final

SECRET_MODE: Final = 0o600  # passwords, password hashes, private keys
PUBLIC_MODE: Final = 0o644  # certificates
PRIVATE_DIR_MODE: Final = 0o700  # a device's folder, the CA folder


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``; the file has exactly ``mode`` afterwards."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask may have taken bits away
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_dir(path: Path, mode: int) -> None:
    """Create ``path`` (and parents) if missing and set its mode."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


def file_mode(path: Path) -> int:
    """Permission bits of ``path`` (not following a symlink)."""
    return path.lstat().st_mode & 0o777
