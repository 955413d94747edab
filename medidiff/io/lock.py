"""An advisory lock on an output folder, so that two runs never write into it at once.

``DST/.medidiff/lock`` is locked with ``flock`` for the whole run. The kernel drops the lock
when the process ends, however it ends (``kill -9`` included), so a stale lock cannot block the
next run. The file also says which process holds it, for the message the waiting run prints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

__all__ = ["LOCK_NAME", "DestinationBusy", "DestinationLock"]

LOCK_NAME = ".medidiff/lock"


class DestinationBusy(RuntimeError):
    """Another run holds the output folder's lock and did not let go within the timeout."""


class DestinationLock:
    """Hold ``dst/.medidiff/lock`` for the duration of a ``with`` block.

    Args:
        dst: the output folder (created if missing).
        timeout: seconds to wait for another run to finish; ``None`` waits as long as it takes,
            ``0`` does not wait.
        on_wait: called once, with a sentence naming the holder, when the lock is busy.
        poll: seconds between attempts while waiting.
    """

    def __init__(
        self,
        dst: str | os.PathLike[str],
        *,
        timeout: float | None = None,
        on_wait: Callable[[str], None] | None = None,
        poll: float = 0.2,
    ) -> None:
        self.path = Path(dst) / LOCK_NAME
        self.timeout = timeout
        self.on_wait = on_wait
        self.poll = poll
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it (pid, host, start time)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return "another medidiff run"
        if not isinstance(info, dict) or not info.get("pid"):  # read while the holder rewrites it
            return "another medidiff run"
        return f"another medidiff run (pid {info.get('pid')} on {info.get('host')}, started {info.get('started')})"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                who = self.holder()
                os.close(fd)
                raise DestinationBusy(
                    f"{self.path.parent.parent} is being written by {who}; wait for it to finish, or "
                    "give a longer --lock-timeout"
                )
            if not told and self.on_wait is not None:
                self.on_wait(
                    f"{self.path.parent.parent} is being written by {self.holder()}; waiting for it to finish"
                )
                told = True
            time.sleep(self.poll)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DestinationLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
