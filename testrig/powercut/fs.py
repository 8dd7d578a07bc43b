"""The power-cut filesystem's FUSE operations (mfusepy's high-level API), in the mount process.

Reads pass through to the backing directory; file data waits in a
:class:`~testrig.powercut.pages.Overlay` until fsync; name changes are
journaled and undone by a cut (the model is in :mod:`testrig.powercut`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pages import Overlay
from .protocol import CutReport

# Flags the filesystem applies itself; the backing file is opened without them.
_OWN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY
_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
_STATVFS_KEYS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                 "f_flag", "f_frsize", "f_namemax")  # fmt: skip


@dataclass
class _Handle:
    fd: int
    ino: int
    boot: int
    append: bool
    sync: bool


@dataclass
class _Journal:
    """Uncommitted name changes, newest last, each with how to undo it."""

    undo: list[tuple[str, str, str]] = field(default_factory=list)
    trash: list[str] = field(default_factory=list)


class PowerCutFs:
    """The FUSE operations (mfusepy's high-level API), passing through to ``backing``."""

    use_ns = True  # mfusepy: utimens in nanoseconds

    def __init__(self, backing: Path, trash: Path) -> None:
        self.backing = backing
        self.trash = trash
        self.powered = True
        self.boot = 0
        self._lock = threading.RLock()
        self._handles: dict[int, _Handle] = {}
        self._overlays: dict[int, Overlay] = {}
        self._journal = _Journal()
        self._next_fh = itertools.count(1)
        self._next_trash = itertools.count()

    # -- power ---------------------------------------------------------------

    def cut(self) -> CutReport:
        """Power off: drop unsynced data, undo uncommitted names, fail everything after."""
        with self._lock:
            self.powered = False
            dirty = [o for o in self._overlays.values() if o.dirty]
            report = CutReport(
                len(dirty), sum(o.pending_bytes() for o in dirty), len(self._journal.undo)
            )
            for overlay in self._overlays.values():
                overlay.close()
            self._overlays.clear()
            for action, a, b in reversed(self._journal.undo):
                self._undo(action, a, b)
            self._journal = _Journal()
            for fh, handle in list(self._handles.items()):
                os.close(handle.fd)
                self._handles[fh] = _Handle(-1, handle.ino, -1, False, False)
            return report

    def power_on(self) -> None:
        """Power on again: the mount shows what was durable at the cut."""
        with self._lock:
            self.boot += 1
            self.powered = True

    def _undo(self, action: str, a: str, b: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if action == "remove":
                target = self._real(a)
                if target.is_dir() and not target.is_symlink():
                    target.rmdir()
                else:
                    target.unlink()
            elif action == "rename":
                self._real(a).rename(self._real(b))
            elif action == "restore":
                (self.trash / a).rename(self._real(b))

    def _commit_names(self) -> None:
        for name in self._journal.trash:
            victim = self.trash / name
            with contextlib.suppress(FileNotFoundError):
                if victim.is_dir() and not victim.is_symlink():
                    victim.rmdir()
                else:
                    victim.unlink()
        self._journal = _Journal()

    def _to_trash(self, path: str) -> None:
        name = str(next(self._next_trash))
        self._real(path).rename(self.trash / name)
        self._journal.trash.append(name)
        self._journal.undo.append(("restore", name, path))

    # -- helpers -------------------------------------------------------------

    def _check(self) -> None:
        if not self.powered:
            raise OSError(errno.EIO, "power is off")

    def _real(self, path: str) -> Path:
        return self.backing / path.lstrip("/")

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None or handle.boot != self.boot:
            raise OSError(errno.EIO, "handle from before the power cut")
        return handle

    def _overlay(self, ino: int, fd: int) -> Overlay:
        overlay = self._overlays.get(ino)
        if overlay is None:
            overlay = self._overlays[ino] = Overlay(os.dup(fd))
        return overlay

    def _forget_if_clean(self, ino: int) -> None:
        overlay = self._overlays.get(ino)
        if overlay is None or overlay.dirty:
            return
        if not any(h.ino == ino and h.boot == self.boot for h in self._handles.values()):
            overlay.close()
            del self._overlays[ino]

    def _open_backing(self, path: str, flags: int, mode: int = 0, *, create: bool = False) -> int:
        real = self._real(path)
        plain = (flags & ~_OWN_FLAGS) | (os.O_CREAT if create else 0)
        try:  # read-write whatever the caller asked for: fsync writes through this fd
            return os.open(real, (plain & ~os.O_ACCMODE) | os.O_RDWR, mode)
        except (PermissionError, IsADirectoryError):
            return os.open(real, plain, mode)

    def _new_handle(self, fd: int, flags: int) -> int:
        fh = next(self._next_fh)
        ino = os.fstat(fd).st_ino
        self._handles[fh] = _Handle(
            fd, ino, self.boot, bool(flags & os.O_APPEND), bool(flags & _SYNC_FLAGS)
        )
        return fh

    def _sync(self, ino: int) -> None:
        overlay = self._overlays.get(ino)
        if overlay is not None and overlay.dirty:
            overlay.commit()
        self._commit_names()  # a journal commit makes every name change durable
        self._forget_if_clean(ino)

    # -- FUSE operations -----------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            # No kernel caching of names or attributes: after a cut the mount must
            # show the backing state at once. hard_remove: unlink an open file for
            # real instead of renaming it to .fuse_hidden*.
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.attr_timeout = 0.0
            config.hard_remove = 1
            config.kernel_cache = 0
        os.write(1, b"ready\n")

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        with self._lock:
            self._check()
            if fh is not None and fh in self._handles:
                st = os.fstat(self._handle(fh).fd)
            elif path is not None:
                st = os.lstat(self._real(path))
            else:
                raise OSError(errno.EBADF, "no path and no handle")
            attrs = {
                key: getattr(st, key)
                for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
            }
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            overlay = self._overlays.get(st.st_ino)
            if overlay is not None and stat.S_ISREG(st.st_mode):
                attrs["st_size"] = overlay.size
            attrs["st_blocks"] = (attrs["st_size"] + 511) // 512
            return attrs

    def access(self, path: str, amode: int) -> int:
        with self._lock:
            self._check()
            if not os.access(self._real(path), amode):
                raise OSError(errno.EACCES, "access denied")
            return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._lock:
            self._check()
            return [".", "..", *(entry.name for entry in self._real(path).iterdir())]

    def readlink(self, path: str) -> str:
        with self._lock:
            self._check()
            return str(self._real(path).readlink())

    def statfs(self, path: str) -> dict[str, int]:
        with self._lock:
            self._check()
            sv = os.statvfs(self._real(path))
            return {key: getattr(sv, key) for key in _STATVFS_KEYS}

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            self._check()
            fd = self._open_backing(path, flags)
            fh = self._new_handle(fd, flags)
            if flags & os.O_TRUNC:
                self._overlay(self._handles[fh].ino, fd).truncate(0)
            return fh

    def create(self, path: str, mode: int, flags: int) -> int:
        with self._lock:
            self._check()
            existed = os.path.lexists(self._real(path))
            fd = self._open_backing(path, flags, mode, create=True)
            if not existed:
                self._journal.undo.append(("remove", path, ""))
            fh = self._new_handle(fd, flags)
            if existed and flags & os.O_TRUNC:
                self._overlay(self._handles[fh].ino, fd).truncate(0)
            return fh

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            self._check()
            handle = self._handle(fh)
            overlay = self._overlays.get(handle.ino)
            if overlay is None:
                return os.pread(handle.fd, size, offset)
            return overlay.read(size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            self._check()
            handle = self._handle(fh)
            overlay = self._overlay(handle.ino, handle.fd)
            overlay.write(data, overlay.size if handle.append else offset)
            if handle.sync:
                self._sync(handle.ino)
            return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._lock:
            self._check()
            if fh is not None and fh in self._handles:
                handle = self._handle(fh)
                self._overlay(handle.ino, handle.fd).truncate(length)
                return 0
            if path is None:
                raise OSError(errno.EBADF, "no path and no handle")
            fd = os.open(self._real(path), os.O_RDWR)
            try:
                self._overlay(os.fstat(fd).st_ino, fd).truncate(length)
            finally:
                os.close(fd)
            return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self._lock:
            self._check()
            self._sync(self._handle(fh).ino)
            return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._lock:
            self._check()
            self._commit_names()
            return 0

    def flush(self, path: str | None, fh: int) -> int:
        with self._lock:
            self._check()  # a close syncs nothing; a stale handle may still close
            return 0

    def release(self, path: str | None, fh: int) -> int:
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is not None and handle.boot == self.boot:
                os.close(handle.fd)
                self._forget_if_clean(handle.ino)
            return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            self._check()
            self._real(path).mkdir(mode)
            self._journal.undo.append(("remove", path, ""))
            return 0

    def rmdir(self, path: str) -> int:
        with self._lock:
            self._check()
            if any(self._real(path).iterdir()):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            self._to_trash(path)
            return 0

    def unlink(self, path: str) -> int:
        with self._lock:
            self._check()
            if self._real(path).is_dir() and not self._real(path).is_symlink():
                raise OSError(errno.EISDIR, "is a directory")
            self._to_trash(path)
            return 0

    def rename(self, old: str, new: str) -> int:
        with self._lock:
            self._check()
            if not os.path.lexists(self._real(old)):
                raise OSError(errno.ENOENT, "no such file")
            if os.path.lexists(self._real(new)):
                target = self._real(new)
                if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
                self._to_trash(new)
            self._real(old).rename(self._real(new))
            self._journal.undo.append(("rename", new, old))
            return 0

    def link(self, target: str, source: str) -> int:
        with self._lock:
            self._check()
            os.link(self._real(source), self._real(target))
            self._journal.undo.append(("remove", target, ""))
            return 0

    def symlink(self, target: str, source: str) -> int:
        with self._lock:
            self._check()
            self._real(target).symlink_to(source)
            self._journal.undo.append(("remove", target, ""))
            return 0

    def chmod(self, path: str, mode: int) -> int:
        with self._lock:
            self._check()
            self._real(path).chmod(mode)
            return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        with self._lock:
            self._check()
            os.lchown(self._real(path), uid, gid)
            return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        with self._lock:
            self._check()
            if times is None:
                os.utime(self._real(path), follow_symlinks=False)
            else:
                os.utime(self._real(path), ns=times, follow_symlinks=False)
            return 0
