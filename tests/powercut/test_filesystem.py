"""The power-cut filesystem itself: synced data survives a cut, nothing else does."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from testrig.powercut import PAGE, PowerCutMount

from .conftest import needs_fuse

pytestmark = needs_fuse


def _write(path: Path, data: bytes, *, sync: bool, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _names(disk: PowerCutMount) -> list[str]:
    return sorted(entry.name for entry in disk.path.iterdir())


def _power_cycle(disk: PowerCutMount) -> None:
    disk.cut()
    disk.power_on()


def test_synced_data_survives_and_the_unsynced_tail_is_dropped(disk: PowerCutMount) -> None:
    """fsync'd bytes survive; bytes written after the last fsync are gone after the cut."""
    path = disk.path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"synced;")
    os.fsync(fd)
    os.write(fd, b"not synced")
    os.close(fd)
    assert path.read_bytes() == b"synced;not synced"  # visible before the cut
    report = disk.cut()
    assert report.dropped_files == 1
    assert report.dropped_bytes > 0
    disk.power_on()
    assert path.read_bytes() == b"synced;"
    assert path.stat().st_size == 7


def test_fdatasync_makes_data_durable_too(disk: PowerCutMount) -> None:
    """fdatasync is enough for data and size (what Redis calls for appendfsync)."""
    path = disk.path / "aof"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for n in range(5):
        os.write(fd, b"%d\n" % n)
        os.fdatasync(fd)
    os.write(fd, b"lost\n")
    os.close(fd)
    _power_cycle(disk)
    assert path.read_bytes() == b"0\n1\n2\n3\n4\n"


def test_a_new_file_never_synced_vanishes_with_its_name(disk: PowerCutMount) -> None:
    """An unsynced new file is gone entirely: data and directory entry."""
    _write(disk.path / "fresh", b"data", sync=False)
    (disk.path / "sub").mkdir()
    assert _names(disk) == ["fresh", "sub"]
    report = disk.cut()
    assert report.undone_names == 2
    disk.power_on()
    assert _names(disk) == []


def test_fsync_commits_the_files_name_with_its_data(disk: PowerCutMount) -> None:
    """fsync of a new file is a journal commit: its name and data both survive."""
    _write(disk.path / "kept", b"data", sync=True)
    _power_cycle(disk)
    assert (disk.path / "kept").read_bytes() == b"data"


def test_rename_over_a_file_is_undone_until_a_commit(disk: PowerCutMount) -> None:
    """The atomic-replace pattern: without a directory sync the old file comes back."""
    _write(disk.path / "manifest", b"old", sync=True)
    _write(disk.path / "manifest.tmp", b"new", sync=True)
    (disk.path / "manifest.tmp").rename(disk.path / "manifest")
    assert (disk.path / "manifest").read_bytes() == b"new"
    _power_cycle(disk)
    assert (disk.path / "manifest").read_bytes() == b"old"
    assert (disk.path / "manifest.tmp").read_bytes() == b"new"

    (disk.path / "manifest.tmp").rename(disk.path / "manifest")
    dirfd = os.open(disk.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dirfd)
    os.close(dirfd)
    _power_cycle(disk)
    assert _names(disk) == ["manifest"]
    assert (disk.path / "manifest").read_bytes() == b"new"


def test_unlink_is_undone_until_a_commit(disk: PowerCutMount) -> None:
    """A deleted file comes back after a cut unless the deletion was committed."""
    _write(disk.path / "a", b"A", sync=True)
    _write(disk.path / "b", b"B", sync=True)
    (disk.path / "a").unlink()
    _power_cycle(disk)
    assert (disk.path / "a").read_bytes() == b"A"
    (disk.path / "a").unlink()
    _write(disk.path / "b", b"B2", sync=True)  # any fsync commits the journal
    _power_cycle(disk)
    assert _names(disk) == ["b"]


def test_truncate_is_data_and_waits_for_fsync(disk: PowerCutMount) -> None:
    """Shrinking then growing reads zeros; unsynced it is undone, synced it stays."""
    path = disk.path / "t"
    original = bytes(range(256)) * 40  # 10,240 bytes: spans pages
    _write(path, original, sync=True)
    os.truncate(path, 100)
    os.truncate(path, 5000)
    assert path.read_bytes() == original[:100] + bytes(4900)
    _power_cycle(disk)
    assert path.read_bytes() == original

    fd = os.open(path, os.O_RDWR)
    os.ftruncate(fd, 100)
    os.ftruncate(fd, 5000)
    os.fsync(fd)
    os.close(fd)
    _power_cycle(disk)
    assert path.read_bytes() == original[:100] + bytes(4900)


def test_open_with_o_trunc_is_undone_without_fsync(disk: PowerCutMount) -> None:
    """O_TRUNC empties the file only in memory until fsync."""
    path = disk.path / "cfg"
    _write(path, b"durable", sync=True)
    _write(path, b"x", sync=False, flags=os.O_TRUNC)
    assert path.read_bytes() == b"x"
    _power_cycle(disk)
    assert path.read_bytes() == b"durable"


def test_appends_go_to_the_end_and_unsynced_ones_are_dropped(disk: PowerCutMount) -> None:
    """O_APPEND from two handles interleaves at the end; the cut keeps the synced prefix."""
    path = disk.path / "journal"
    first = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    second = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(first, b"1")
    os.write(second, b"2")
    os.write(first, b"3")
    os.fsync(second)
    os.write(second, b"4")
    os.close(first)
    os.close(second)
    assert path.read_bytes() == b"1234"
    _power_cycle(disk)
    assert path.read_bytes() == b"123"


def test_o_sync_handles_write_through(disk: PowerCutMount) -> None:
    """Every write of an O_SYNC handle is durable without an explicit fsync."""
    _write(disk.path / "s", b"each write synced", sync=False, flags=os.O_SYNC)
    _power_cycle(disk)
    assert (disk.path / "s").read_bytes() == b"each write synced"


def test_everything_fails_while_the_power_is_off_and_old_handles_stay_dead(
    disk: PowerCutMount,
) -> None:
    """After a cut: EIO until power on; a handle opened before the cut is dead for good."""
    path = disk.path / "f"
    _write(path, b"data", sync=True)
    fd = os.open(path, os.O_RDWR)
    disk.cut()
    with pytest.raises(OSError, match="Input/output error") as off:
        path.read_bytes()
    assert off.value.errno == errno.EIO
    disk.power_on()
    with pytest.raises(OSError, match="Input/output error") as stale:
        os.pwrite(fd, b"zombie", 0)
    assert stale.value.errno == errno.EIO
    os.close(fd)
    assert path.read_bytes() == b"data"


def test_random_writes_and_truncates_match_a_model(disk: PowerCutMount) -> None:
    """Seeded random unaligned writes/truncates/fsyncs: reads match a model, before and after."""
    rng = random.Random(11)
    path = disk.path / "random"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.fsync(fd)
    current, synced = bytearray(), b""
    for _ in range(300):
        roll = rng.random()
        if roll < 0.7:
            offset = rng.randrange(0, 4 * PAGE)
            data = rng.randbytes(rng.randrange(1, 2 * PAGE))
            os.pwrite(fd, data, offset)
            if offset > len(current):
                current.extend(bytes(offset - len(current)))
            current[offset : offset + len(data)] = data
        elif roll < 0.85:
            length = rng.randrange(0, 5 * PAGE)
            os.ftruncate(fd, length)
            current = current[:length] + bytearray(max(0, length - len(current)))
        else:
            os.fsync(fd)
            synced = bytes(current)
        assert os.pread(fd, 6 * PAGE, 0) == bytes(current)
    os.close(fd)
    assert path.stat().st_size == len(current)
    _power_cycle(disk)
    assert path.read_bytes() == synced
