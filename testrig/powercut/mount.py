"""The power-cut mount seen from the test (parent process): start, cut, power on, stop."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import PowerCutError
from .protocol import CUT_SIGNAL, POWER_ON_SIGNAL, CutReport

START_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 10.0
SERVE_MODULE = "testrig.powercut.serve"


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
                [sys.executable, "-m", SERVE_MODULE, str(self.backing), str(self.trash),
                 str(self.path)],
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
        return CutReport.parse(self._command(CUT_SIGNAL, "cut"))

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
