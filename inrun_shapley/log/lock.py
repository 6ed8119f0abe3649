"""One writer per value log: a lock file that a crash cannot leave stuck.

A writer holds ``.writer.lock`` inside the log directory for as long as it is open. The lock is
two things at once:

* an advisory ``flock`` on the file, which the kernel releases when the holding process dies
  (however it dies), so on one machine a crashed writer never blocks the next one;
* the holder's identity written into the file (``host``, ``pid``, when it was taken), so a lock
  left by a process that can no longer hold it is recognised: on the same host a lock whose
  ``pid`` is no longer running is stale and taken over; a lock written on another host (a
  multi-node job, a shared filesystem) cannot be checked from here and is refused with the
  holder's name and the file to delete once that process is known to be gone.

The lock file is removed on a clean close. Readers never take it: they read the committed
header and retry when a concurrent compaction removes the files it listed (see
:meth:`inrun_shapley.log.ShapleyLog.load`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from inrun_shapley.errors import LogError

LOCK_FILE = ".writer.lock"

try:  # pragma: no cover - always present on Linux and macOS
    import fcntl
except ImportError:  # pragma: no cover - Windows: identity check only
    fcntl = None  # type: ignore[assignment]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover
        return True
    try:  # a killed child not yet reaped by its parent still answers kill(0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return True


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"host": "?", "pid": -1, "unreadable": True}
    return holder if isinstance(holder, dict) else {"host": "?", "pid": -1, "unreadable": True}


def _describe(holder: dict[str, Any]) -> str:
    return f"process {holder.get('pid')} on host {holder.get('host')!r} (since {holder.get('since', '?')})"


class WriterLock:
    """The exclusive lock of one log directory; :meth:`release` (or process exit) frees it.

    Args:
        root: the log directory (must exist).

    Raises:
        LogError: another live writer holds the lock (named by host and pid), or the lock was
            left by a process on another host that cannot be checked from here.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None
        self._acquire()

    def _acquire(self) -> None:
        for _ in range(100):  # retried only when the file is replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                locked = self._flock(fd)
                if locked and not self._same_file(fd):
                    os.close(fd)  # released and unlinked by its holder meanwhile: lock the new one
                    continue
                holder = _read_holder(fd)
                if not locked:
                    raise self._refusal(holder, "holds the lock")
                if holder is not None and not self._stale(holder, real_lock=locked == "locked"):
                    raise self._refusal(holder, "wrote the lock")
                self.took_over = holder
                payload = json.dumps({"host": self.host, "pid": self.pid,
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, payload)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise LogError(f"{self.path}: the writer lock kept changing hands; retry")  # pragma: no cover

    @staticmethod
    def _flock(fd: int) -> str | bool:
        """``"locked"``; ``"unsupported"`` where the filesystem has no locks (then the identity
        in the file decides alone); False when another open file holds it."""
        if fcntl is None:  # pragma: no cover
            return "unsupported"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # pragma: no cover - e.g. ENOLCK on filesystems without locks
            return "unsupported"
        return "locked"

    def on_disk(self) -> bool:
        """Whether the held lock is still the file at :attr:`path` (not moved away with its
        directory)."""
        return self._fd is not None and self._same_file(self._fd)

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _stale(self, holder: dict[str, Any], real_lock: bool) -> bool:
        """A lock whose holder cannot be writing any more (we hold the flock already)."""
        if holder.get("unreadable"):
            return True  # a writer killed while writing its identity
        if holder.get("host") != self.host:
            return False  # cannot check a process on another machine
        if real_lock:
            return True  # the kernel freed its flock: the holder on this host is gone
        pid = holder.get("pid")
        return not isinstance(pid, int) or pid == self.pid or not _pid_alive(pid)

    def _refusal(self, holder: dict[str, Any] | None, how: str) -> LogError:
        root = self.path.parent
        who = "another process" if holder is None else _describe(holder)
        if holder is not None and holder.get("host") == self.host and holder.get("pid") == self.pid:
            who += " (this process: close the earlier writer first)"
        advice = (
            "Only one writer may write a value log at a time (two would lose each other's records). "
            "Close the other writer first, or give this one its own path (per-rank logs go to "
            f"rank<N> subfolders, which ShapleyLog.load merges)."
        )
        if holder is not None and holder.get("host") != self.host:
            advice += (f" The lock was written on another host, so this host cannot check whether that "
                       f"process still runs; if it is gone, delete {self.path} and retry.")
        return LogError(f"{root}: {who} {how}: a value log writer is already open on this directory. {advice}")

    def release(self) -> None:
        """Remove the lock file and free the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.getpid() == self.pid and self._same_file(fd):  # never from a forked child (DataLoader workers)
                self.path.unlink()
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)  # frees the flock after the unlink: a waiter then locks a fresh file

    def __del__(self) -> None:  # a writer dropped without close() frees its lock with it
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None


__all__ = ["LOCK_FILE", "WriterLock"]
