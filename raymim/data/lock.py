"""One ``raymim prepare`` per output folder: a lock file that works on shared file systems.

``<out>/.raymim-prepare.lock`` holds JSON: host, pid, the process's start time, when the run
began and a random token. It is created whole or not at all: written to a unique temp file and
hard-linked to the lock name (``link`` fails when the name exists, atomically, on local disks
and on NFS, Lustre, GPFS and CephFS alike; where hard links are refused it falls back to
``open(O_CREAT | O_EXCL)``, atomic on NFSv3+). ``fcntl`` / ``flock`` locks were not used: they
are silently local-only or refused on several cluster file systems, and a lock that is not seen
from the other nodes is worse than none. Object-store mounts (s3fs, gcsfuse) give no atomic
create; a lock there is advisory only.

While it runs, the holder touches the lock every :data:`HEARTBEAT_S` seconds. A second run finds
the lock and stops with :class:`PrepareLocked` (``raymim prepare`` exits 2 naming the lock file),
unless the lock is *stale*:

- on the same host, its process is gone (no such pid, a zombie, or a pid reused by a process that
  started at another time);
- from another host (whose processes cannot be checked), its heartbeat is older than
  :data:`STALE_AFTER_S` (generous, for clock skew between hosts and file servers);
- unreadable content older than a minute (no holder writes a lock in pieces, so this is debris).

A stale lock is taken over: the taker first creates ``<lock>.break-<token of the stale lock>``
exclusively, so of several runs that find the same stale lock only one removes it (after checking
it still holds that token), then competes for the lock like any other run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

LOCK_NAME = ".raymim-prepare.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_DEBRIS_S = 60.0

__all__ = ["LOCK_NAME", "OutputLock", "PrepareLocked", "lock_holder"]


class PrepareLocked(RuntimeError):
    """Another ``raymim prepare`` holds the output folder's lock (the message names it)."""


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def lock_holder(path: Path) -> dict[str, Any] | None:
    """The lock's record plus ``token`` (its content hash when unreadable), ``age_s`` (since its
    last heartbeat) and ``stale``; None when there is no lock."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
        assert isinstance(rec, dict) and {"host", "pid", "token"} <= set(rec)
    except (ValueError, AssertionError):
        return {"token": hashlib.sha256(raw).hexdigest()[:16], "age_s": age, "stale": age > _DEBRIS_S,
                "host": "?", "pid": "?", "started": None}
    if rec["host"] == socket.gethostname():
        began = _process_start(int(rec["pid"]))
        stale = began is None or (rec.get("process_start") is not None
                                  and abs(began - float(rec["process_start"])) > 1.0)
    else:
        stale = age > STALE_AFTER_S
    return dict(rec, age_s=age, stale=stale)


def _create(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (atomically); returns whether it did."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: exclusive create instead
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break(path: Path, holder: dict[str, Any]) -> None:
    """Remove the stale lock ``holder`` unless another run is already removing it."""
    brk = path.with_name(f"{path.name}.break-{holder['token']}")
    with contextlib.suppress(FileNotFoundError):
        if time.time() - brk.stat().st_mtime > _DEBRIS_S:  # a taker died mid-takeover
            brk.unlink(missing_ok=True)
    try:
        fd = os.open(brk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    try:
        current = lock_holder(path)
        if current is not None and current["token"] == holder["token"]:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        brk.unlink(missing_ok=True)


class OutputLock:
    """The lock of one output folder, held as a context manager (or :meth:`acquire` / :meth:`release`).

    Example::

        with OutputLock(out):   # PrepareLocked when another live run holds it
            ...write shards...
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.path = Path(out) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.took_over: dict[str, Any] | None = None  # the stale lock this run replaced, if any
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> OutputLock:
        me = os.getpid()
        rec = {"host": socket.gethostname(), "pid": me, "process_start": _process_start(me),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}
        for _ in range(5):
            if _create(self.path, json.dumps(rec)):
                self._beat = threading.Thread(target=self._heartbeat, name="raymim-prepare-lock", daemon=True)
                self._beat.start()
                return self
            holder = lock_holder(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            if not holder["stale"]:
                raise PrepareLocked(
                    f"another raymim prepare is writing this output folder (pid {holder['pid']} on host "
                    f"{holder['host']}, since {holder.get('started')}); lock {self.path}. Wait for it to finish. "
                    f"A lock of a dead run is taken over by itself (same host: at once; another host: "
                    f"{STALE_AFTER_S / 60:.0f} min after its last heartbeat); delete the file only if no run "
                    "is using it.")
            self.took_over = holder
            _break(self.path, holder)
        raise PrepareLocked(f"could not take the lock {self.path} (other runs keep taking it); try again.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        holder = lock_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
