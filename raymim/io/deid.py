"""De-identification: keyed case ids and content digests.

A case id is ``HMAC-SHA256(key, content digest)`` truncated to 20 hex characters: stable for the
same bytes (so resume and deduplication work), unlinkable to paths or patient identifiers
without the key. The key comes from ``$RAYMIM_DEID_KEY`` (share it across output folders to get
the same ids everywhere) or from a per-output-folder secret file created on first use
(``<out>/.raymim_secret``, mode 0600; delete it and the ids change). Outputs never contain
source paths unless the user asks for ``--keep-paths``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from raymim.io.checks import CaseRejected, open_regular, regular_file

KEY_ENV = "RAYMIM_DEID_KEY"
SECRET_NAME = ".raymim_secret"


def deid_key(out_dir: str | os.PathLike | None) -> bytes:
    """The HMAC key: ``$RAYMIM_DEID_KEY``, else the output folder's secret, else an ephemeral one."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    if out_dir is None:
        return secrets.token_bytes(32)
    path = Path(out_dir) / SECRET_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if not p.name.startswith(".") and _is_regular(p))
    return [path]


def _is_regular(path: Path) -> bool:
    try:
        regular_file(path)
    except CaseRejected:
        return False
    return True


def content_digest(*paths: str | os.PathLike | Sequence[str | os.PathLike] | None, chunk: int = 1 << 22) -> str:
    """SHA-256 over the bytes of the given inputs: a file, a folder (its regular files in name
    order) or a list of files (a DICOM series' slices, in the given order).

    Only regular files are opened (:func:`raymim.io.checks.open_regular`): a FIFO, a device or a
    symlink to one raises :class:`~raymim.io.checks.NotRegularFile` (an ``OSError``) at once
    instead of blocking or reading forever.
    """
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        h.update(f"|{i}|".encode())
        if p is None:
            continue
        if isinstance(p, list | tuple):
            files, named = [Path(f) for f in p], True
        else:
            files, named = _files(Path(p)), Path(p).is_dir()
        for f in files:
            h.update(os.fsencode(f.name) if named else b"")  # fsencode: non-UTF-8 names hash too
            with open_regular(f) as fh:
                while block := fh.read(chunk):
                    h.update(block)
    return h.hexdigest()


def keyed_id(key: bytes, text: str) -> str:
    """20 hex characters of HMAC-SHA256(key, text)."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:20]
