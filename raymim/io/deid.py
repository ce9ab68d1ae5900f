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
from pathlib import Path

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
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def content_digest(*paths: str | os.PathLike | None, chunk: int = 1 << 22) -> str:
    """SHA-256 over the bytes of the given files (folders: their files in name order)."""
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        h.update(f"|{i}|".encode())
        if p is None:
            continue
        for f in _files(Path(p)):
            h.update(f.name.encode() if Path(p).is_dir() else b"")
            with open(f, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
    return h.hexdigest()


def keyed_id(key: bytes, text: str) -> str:
    """20 hex characters of HMAC-SHA256(key, text)."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:20]
