"""One file's unsynced state in the power-cut filesystem: dirty pages and size, until fsync."""

from __future__ import annotations

import os

PAGE = 4096


class Overlay:
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
