"""A FUSE passthrough filesystem that can cut the power: unsynced writes vanish.

SIGKILL leaves the page cache intact, so a process-kill test cannot tell
``appendfsync everysec`` from ``always`` or ``synchronous=OFF`` from ``FULL``.
This filesystem can: it passes reads through to a backing directory, keeps
every write in memory until the file is fsynced, and on SIGUSR1 (or
:meth:`PowerCutMount.cut`) drops everything not synced, as a power cut does.

::

    with PowerCutMount(tmp_path / "disk") as disk:
        start_redis(dir=disk.path)
        ...
        disk.cut()          # power off: unsynced data gone, every operation now EIO
        redis.kill()
        disk.power_on()     # the mount shows only what was synced
        start_redis(dir=disk.path)

The model (harsher than a real kernel, never kinder):

* **File data and size** are per file (inode): writes, truncates and appends
  live in memory until ``fsync``/``fdatasync`` of that file (or each write of
  an ``O_SYNC``/``O_DSYNC`` handle). Closing a file syncs nothing, and nothing
  is ever written back in the background.
* **Names** (create, unlink, rename, mkdir, rmdir, link, symlink) are
  journaled, as ext4 does: they show at once and become durable at the next
  journal commit, which any ``fsync``/``fdatasync`` of a file or directory
  forces. A cut undoes the uncommitted ones. Modes, owners and times are not
  tracked.
* **A cut** powers the disk off: it drops all unsynced data, undoes the
  uncommitted names, and fails every later operation with EIO until
  :meth:`PowerCutMount.power_on`; handles opened before the cut stay dead
  after it, as a process from before a reboot would be.

The filesystem runs in its own process (``python fleet/powercut.py``), so the
kernel's requests never wait for the test's GIL; it needs ``/dev/fuse``, root
(or ``fusermount3``) and libfuse 3 through ``mfusepy`` (dev extra).

Hierarchy::

    PowerCutError    the mount could not be started, or did not answer a command
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

PAGE = 4096
START_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 10.0
CUT_SIGNAL = signal.SIGUSR1
POWER_ON_SIGNAL = signal.SIGUSR2
# Flags the filesystem applies itself; the backing file is opened without them.
_OWN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY
_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
_STATVFS_KEYS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                 "f_flag", "f_frsize", "f_namemax")  # fmt: skip


class PowerCutError(RuntimeError):
    """The power-cut mount could not be started, or did not answer a command."""


@dataclass(frozen=True)
class CutReport:
    """What one power cut threw away."""

    dropped_files: int
    dropped_bytes: int
    undone_names: int


# ---------------------------------------------------------------------------
# The filesystem (runs in the mount process)
# ---------------------------------------------------------------------------


class _Overlay:
    """One file's unsynced state: dirty pages over the backing file, and its size.

    Invariants: bytes of the backing file at or past ``valid_upto`` are stale
    (they read as zeros unless a page covers them); page bytes past ``size``
    are zero; ``valid_upto <= size``.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd  # owned: keeps the inode alive while data is pending
        self.size = os.fstat(fd).st_size
        self.valid_upto = self.size
        self.pages: dict[int, bytearray] = {}
        self.dirty = False

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            start = index * PAGE
            wanted = max(0, min(PAGE, self.valid_upto - start))
            page = bytearray(os.pread(self.fd, wanted, start) if wanted else b"")
            page.extend(bytes(PAGE - len(page)))
            self.pages[index] = page
        return page

    def read(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            index, start = divmod(pos, PAGE)
            take = min(PAGE - start, end - pos)
            page = self.pages.get(index)
            if page is not None:
                out += page[start : start + take]
            else:
                valid = max(0, min(take, self.valid_upto - pos))
                chunk = os.pread(self.fd, valid, pos) if valid else b""
                out += chunk + bytes(take - len(chunk))
            pos += take
        return bytes(out)

    def write(self, data: bytes, offset: int) -> None:
        pos, view = offset, memoryview(data)
        while view:
            index, start = divmod(pos, PAGE)
            take = min(PAGE - start, len(view))
            self._page(index)[start : start + take] = view[:take]
            view, pos = view[take:], pos + take
        self.size = max(self.size, offset + len(data))
        self.dirty = True

    def truncate(self, length: int) -> None:
        if length < self.size:
            index, start = divmod(length, PAGE)
            if start:
                self._page(index)[start:] = bytes(PAGE - start)
                index += 1
            for stale in [i for i in self.pages if i >= index]:
                del self.pages[stale]
            self.valid_upto = min(self.valid_upto, length)
        self.size = length
        self.dirty = True

    def pending_bytes(self) -> int:
        return len(self.pages) * PAGE + (self.size != self.valid_upto)

    def commit(self) -> None:
        """Write the pending state to the backing file (what fsync makes durable)."""
        os.ftruncate(self.fd, self.valid_upto)  # stale tail → zeros below
        os.ftruncate(self.fd, self.size)
        for index, page in sorted(self.pages.items()):
            start = index * PAGE
            os.pwrite(self.fd, page[: max(0, min(PAGE, self.size - start))], start)
        self.pages.clear()
        self.valid_upto = self.size
        self.dirty = False

    def close(self) -> None:
        os.close(self.fd)


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
        self._overlays: dict[int, _Overlay] = {}
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

    def _overlay(self, ino: int, fd: int) -> _Overlay:
        overlay = self._overlays.get(ino)
        if overlay is None:
            overlay = self._overlays[ino] = _Overlay(os.dup(fd))
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


def _control_loop(fs: PowerCutFs) -> None:
    """SIGUSR1 cuts the power, SIGUSR2 restores it; each answers one line on stdout."""
    while True:
        sig = signal.sigwait({CUT_SIGNAL, POWER_ON_SIGNAL})
        if sig == CUT_SIGNAL:
            r = fs.cut()
            line = f"cut {r.dropped_files} {r.dropped_bytes} {r.undone_names}\n"
        else:
            fs.power_on()
            line = "on\n"
        os.write(1, line.encode())


def serve(backing: Path, trash: Path, mountpoint: Path) -> None:
    """Mount the filesystem on ``mountpoint`` and serve it until SIGTERM (foreground)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy  # noqa: PLC0415  (dev extra; only the mount process needs it)

    # Blocked here, so every libfuse thread inherits the mask and only the
    # control thread's sigwait sees the power signals.
    signal.pthread_sigmask(signal.SIG_BLOCK, {CUT_SIGNAL, POWER_ON_SIGNAL})
    fs = PowerCutFs(backing, trash)
    threading.Thread(target=_control_loop, args=(fs,), name="power", daemon=True).start()
    # libfuse 3 reports the SIGTERM that ends its loop as an error (8); a mount
    # that failed never said "ready", which the parent reports with this log.
    with contextlib.suppress(RuntimeError):
        mfusepy.FUSE(fs, str(mountpoint), foreground=True, nothreads=False, fsname="powercut")


# ---------------------------------------------------------------------------
# The mount, seen from the test (parent process)
# ---------------------------------------------------------------------------


class PowerCutMount:
    """Mounts a power-cut filesystem on ``base/mnt`` (durable data in ``base/disk``).

    Args:
        base: a directory of its own; created if missing.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.backing = base / "disk"
        self.trash = base / "trash"
        self.path = base / "mnt"
        self.log_path = base / "powercut.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    @property
    def pid(self) -> int | None:
        """The mount process, to signal it from outside (SIGUSR1 cuts, SIGUSR2 powers on)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Mount and wait until the filesystem answers."""
        for directory in (self.backing, self.trash, self.path):
            directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                # The file itself, not -m: the mount process needs no other module of ours.
                [sys.executable, __file__, str(self.backing), str(self.trash), str(self.path)],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            self._expect("ready", START_TIMEOUT_S)
            self._wait_mounted()
        except BaseException:
            self.stop()
            raise

    def _wait_mounted(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.path.is_mount():
            if time.monotonic() > deadline:
                raise PowerCutError(f"{self.path} is not mounted:\n{self._log_tail()}")
            time.sleep(0.01)

    def cut(self) -> CutReport:
        """Cut the power: unsynced writes and names are gone; every operation fails with EIO."""
        words = self._command(CUT_SIGNAL, "cut").split()
        return CutReport(int(words[1]), int(words[2]), int(words[3]))

    def power_on(self) -> None:
        """Power on: the mount shows only what was synced before the cut."""
        self._command(POWER_ON_SIGNAL, "on")

    def stop(self) -> None:
        """Unmount (SIGTERM to the mount process; a lazy unmount if that fails)."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(START_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self.path.is_mount():
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)

    def _command(self, sig: signal.Signals, answer: str) -> str:
        if self._process is None or self._process.poll() is not None:
            raise PowerCutError(f"the mount process is not running:\n{self._log_tail()}")
        self._process.send_signal(sig)
        return self._expect(answer, COMMAND_TIMEOUT_S)

    def _expect(self, word: str, timeout_s: float) -> str:
        """Read the mount process's next line; it must start with ``word``."""
        process = self._process
        if process is None or process.stdout is None:
            raise PowerCutError("the mount process is not running")
        fd = process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise PowerCutError(f"no {word!r} from the mount process:\n{self._log_tail()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise PowerCutError(f"the mount process exited:\n{self._log_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode()
        if not text.startswith(word):
            raise PowerCutError(f"expected {word!r} from the mount process, got {text!r}")
        return text

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``python fleet/powercut.py BACKING TRASH MOUNTPOINT``: serve until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.exit("usage: python fleet/powercut.py BACKING TRASH MOUNTPOINT")
    serve(Path(args[0]), Path(args[1]), Path(args[2]))


if __name__ == "__main__":
    main()
