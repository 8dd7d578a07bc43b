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

The filesystem runs in its own process (``python -m testrig.powercut.serve``),
so the kernel's requests never wait for the test's GIL; it needs ``/dev/fuse``,
root (or ``fusermount3``) and libfuse 3 through ``mfusepy`` (dev extra).

Modules, one job each:

* ``mount``: :class:`PowerCutMount`, the mount seen from the test (parent process).
* ``serve``: the mount process: mounts the filesystem, answers the power signals.
* ``protocol``: the signals and answer lines between the two, and :class:`CutReport`.
* ``fs``: the FUSE operations and the name journal (mount process).
* ``pages``: one file's unsynced data and size, page by page (mount process).

Errors: :class:`testrig.errors.PowerCutError`, the mount could not be started
or did not answer a command.
"""

from ..errors import PowerCutError
from .mount import PowerCutMount
from .pages import PAGE
from .protocol import CutReport

__all__ = ["PAGE", "CutReport", "PowerCutError", "PowerCutMount"]
