"""Locks that keep two writers from mixing one output folder.

Built on ``filelock``'s :class:`~filelock.FileLock`, which holds an ``flock`` on a lock file.
The kernel drops such a lock when its process ends in any way (``kill -9`` included), and on NFS
the server drops a dead client's locks when its lease runs out, so a lock left by a killed writer
never blocks forever and no heartbeat or time-out guess is needed. On Lustre the file system must
be mounted with ``-o flock`` (``localflock`` locks only within one node).

Beside each lock file a small JSON record says who holds it (host, pid, command, since when), so
a refused writer can be told whom it waits for. The record is informative only: whether a lock is
held is always decided by the ``flock`` itself.

- :class:`Lock` — one lock file: a folder's writer lock, or the claim of one unit of work
  (a cross-validation fold) that several writers of one run folder share out between them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import NmosdError

#: ``filelock`` >= 4 can fall back to a lock-file-exists lock where ``flock`` is missing; such a
#: lock would outlive a killed holder, so it is switched off where the option exists.
_NO_SOFT = (
    {"fallback_to_soft": False}
    if "fallback_to_soft" in inspect.signature(FileLock.__init__).parameters
    else {}
)


def _holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
    }


def describe(record: dict | None) -> str:
    """``pid 123 on host (nmosd-ms cv …) since …`` for an error line."""
    if not record:
        return "another process"
    cmd = record.get("command") or ""
    cmd = f" ({cmd[:80]}{'…' if len(cmd) > 80 else ''})" if cmd else ""
    return f"pid {record.get('pid')} on {record.get('host')}{cmd} since {record.get('since')}"


class Lock:
    """An exclusive lock on ``path`` (created if missing), with a holder record beside it.

    ``acquire(timeout=0)`` tries once; a positive timeout waits up to that many seconds. Locks
    are per open file, so two :class:`Lock` objects on one path exclude each other even within
    one process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.record_path = self.path.with_name(self.path.name + ".json")
        self._lock = FileLock(str(self.path), thread_local=False, **_NO_SOFT)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self, timeout: float = 0) -> bool:
        """True if this object now holds the lock; False if another holder kept it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=timeout, poll_interval=0.05)
        except Timeout:
            return False
        tmp = self.record_path.with_name(f".{self.record_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(_holder_record()) + "\n")
            os.replace(tmp, self.record_path)
        finally:  # an interrupt (Ctrl-C) between the two steps must not leave the temporary
            tmp.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    def remove(self) -> None:
        """Release, then delete the lock file and its holder record (for locks nobody else
        takes by name, such as a writer's registration)."""
        self.release()
        self.path.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)

    def holder(self) -> dict | None:
        """The record of whoever holds the lock now; ``None`` when nobody does."""
        if self.held:
            return _holder_record()
        if not self.path.exists() or Lock(self.path)._lock_free():
            return None
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def _lock_free(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        self._lock.release(force=True)
        return True

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive(path: str | os.PathLike, what: str, wait: float = 0) -> Lock:
    """Take ``path``'s lock for a writer of ``what``, or refuse with one line naming the holder."""
    lock = Lock(path)
    deadline = time.monotonic() + wait
    while not lock.acquire(timeout=min(wait, 1.0) if wait else 0):
        if time.monotonic() >= deadline:
            raise NmosdError(
                f"{what} is being written by {describe(lock.holder())}; wait for it to finish "
                "or choose another folder"
            )
    return lock


#: The lock file of a folder that one writer at a time fills (a cache, a prediction folder); its
#: presence also marks the folder as the toolkit's.
LOCK_NAME = ".nmosd-ms.lock"


def check_own_folder(path: str | os.PathLike, marker: str, what: str) -> None:
    """Refuse ``path`` as an output folder of kind ``what`` unless it is missing, empty, or
    already the toolkit's: it holds ``marker`` (the file that describes a finished one) or the
    lock file of an earlier writer (one killed before it wrote ``marker``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NmosdError(f"the output {path} exists and is not a folder", option="out")
    if (
        path.is_dir()
        and any(path.iterdir())
        and not (path / marker).is_file()
        and not (path / LOCK_NAME).is_file()
    ):
        raise NmosdError(
            f"the output {path} is a non-empty folder that is not {what}", option="out"
        )


@contextlib.contextmanager
def writing_folder(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Create ``path`` if needed and hold its writer lock for the block (a second writer is
    refused with one line naming this one). Temporary files a killed writer left are removed
    first. A folder this call created is removed again if the block fails, so refused input
    leaves nothing behind. Creating and locking the folder first is also the check that it is
    writable, before any long computation."""
    from .io import remove_stale_temporaries

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NmosdError(f"{what} {path} exists and is not a folder")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        lock = exclusive(path / LOCK_NAME, f"{what} {path}")
        try:
            remove_stale_temporaries(path)
            yield path
            ok = True
        finally:
            lock.release()
    finally:
        if created and not ok:
            shutil.rmtree(path, ignore_errors=True)
