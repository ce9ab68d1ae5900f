"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

``raymim prepare`` commits shards, status records, the prior model, the manifest and the
quarantine list this way, so a run killed mid-write resumes from what was committed. The bytes go
to a temporary file *in the same folder* (``os.replace`` is atomic only within one file system),
which is flushed to disk (``fsync``) and then renamed over the target; on any error the temporary
file is removed and the target is left as it was. A run killed outright (SIGKILL, power loss)
can leave a ``.tmp-*`` file behind: :data:`TMP_PREFIX` names them so readers skip or delete them.

Example::

    with atomic_write(out / "shard-0.parquet") as tmp:
        pyarrow.parquet.write_table(table, tmp)
    write_text_atomic(out / "manifest.json", json.dumps(manifest))
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, fsync it and rename it
    onto ``path``. When the block raises, remove it (``path`` keeps its old content, if any)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: several writers of one target (retried Ray tasks) never share a temporary file.
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
