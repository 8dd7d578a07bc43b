"""The mount process: ``python -m testrig.powercut.serve BACKING TRASH MOUNTPOINT``.

Mounts :class:`~testrig.powercut.fs.PowerCutFs` in the foreground until
SIGTERM and answers the power signals (:mod:`testrig.powercut.protocol`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from .fs import PowerCutFs
from .protocol import CUT_SIGNAL, POWER_ON_SIGNAL


def _control_loop(fs: PowerCutFs) -> None:
    """SIGUSR1 cuts the power, SIGUSR2 restores it; each answers one line on stdout."""
    while True:
        sig = signal.sigwait({CUT_SIGNAL, POWER_ON_SIGNAL})
        if sig == CUT_SIGNAL:
            line = fs.cut().line()
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


def main(argv: list[str] | None = None) -> None:
    """``python -m testrig.powercut.serve BACKING TRASH MOUNTPOINT``: serve until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.exit("usage: python -m testrig.powercut.serve BACKING TRASH MOUNTPOINT")
    serve(Path(args[0]), Path(args[1]), Path(args[2]))


if __name__ == "__main__":
    main()
