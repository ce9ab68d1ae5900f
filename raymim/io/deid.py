"""De-identification: keyed case ids, the key that makes them, and report scrubbing.

*Case ids.* A case id is ``HMAC-SHA256(key, content digest)`` truncated to 20 hex characters:
stable for the same bytes (so resume and deduplication work), unlinkable to paths or patient
identifiers without the key. Outputs never contain source paths unless the user asks for
``--keep-paths``.

*The key never lives in the dataset* (copying a prepared folder must not hand it over). It comes
from, first match wins:

1. ``--deid-key FILE`` (``prepare(..., deid_key_file=FILE)``);
2. ``$RAYMIM_DEID_KEY``: the key itself, as text (share it to get the same ids everywhere);
3. ``$RAYMIM_DEID_KEY_FILE``: a key file;
4. the per-user key file :func:`default_key_file` (``$XDG_CONFIG_HOME/raymim/deid.key``, by
   default ``~/.config/raymim/deid.key``).

A key file holds one line of text (the key); a missing one is created on first use with 32
random bytes in hex, mode 0600, in a folder of mode 0700. A key file inside the output folder is
refused. The dataset records only the key's *fingerprint* (:data:`FINGERPRINT_FILE`,
``<out>/deid.json``, a truncated SHA-256 that cannot be turned back into the key), so resuming with
a different key is refused with a clear error (:class:`DeidKeyError`) instead of writing every case
a second time under new ids. Folders prepared by older versions kept their key inside the
dataset (``<out>/.raymim_secret``); they are refused with the command that moves it out (the ids
stay the same), or start over with ``--overwrite``.

*Reports.* :func:`scrub_report` removes from a case's free-text report every identifier value
read from that case's own DICOM header (:func:`raymim.io.dicom.header_identifiers`: person
names, patient / accession / study IDs, dates, institution), matched case-insensitively as whole
words, dates in the usual written forms. This is a safety net, not de-identification: a report
names people, places and dates that no header lists, so free-text reports must be de-identified
upstream, before ``raymim prepare``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from raymim.io.checks import CaseRejected, open_regular, regular_file

KEY_ENV = "RAYMIM_DEID_KEY"
KEY_FILE_ENV = "RAYMIM_DEID_KEY_FILE"
SECRET_NAME = ".raymim_secret"  # where versions before the key moved out of the dataset kept it
FINGERPRINT_FILE = "deid.json"


class DeidKeyError(ValueError):
    """The de-identification key cannot be used for this output folder (the message says why and
    what to do). A ``ValueError``: ``raymim prepare`` reports it as a one-line error (exit 2)."""


# -- the key ---------------------------------------------------------------------------------------


def default_key_file() -> Path:
    """The per-user key file: ``$XDG_CONFIG_HOME/raymim/deid.key`` (default ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "raymim" / "deid.key"


def key_fingerprint(key: bytes) -> str:
    """16 hex characters naming a key without revealing it (recorded in the dataset)."""
    return hashlib.sha256(b"raymim de-identification key fingerprint\x00" + key).hexdigest()[:16]


def _read_key_file(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            key = f.read(1 << 16).strip()
    except (CaseRejected, OSError) as exc:
        raise DeidKeyError(f"the de-identification key file {path} cannot be read ({exc}).") from None
    if not key:
        raise DeidKeyError(f"the de-identification key file {path} is empty.")
    return key


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another prepare created it first: use theirs
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    print(f"raymim: created the de-identification key {path} (mode 0600). Keep it, outside the dataset: "
          "resuming and getting the same case ids again need the same key.", file=sys.stderr)


def resolve_key(key_file: str | os.PathLike | None = None, *, create: bool = True,
                outside: str | os.PathLike | None = None) -> tuple[bytes, str]:
    """``(key, where)``: the key from ``key_file``, ``$RAYMIM_DEID_KEY``, ``$RAYMIM_DEID_KEY_FILE``
    or :func:`default_key_file`, in that order; ``where`` names the source for messages. A missing
    key file is created (``create``) or raises :class:`DeidKeyError`; so does a key file that lies
    inside the folder ``outside`` (checked before anything is created)."""
    if key_file is None and os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode(), f"${KEY_ENV}"
    path = Path(key_file or os.environ.get(KEY_FILE_ENV) or default_key_file()).expanduser()
    if outside is not None:
        try:
            inside = path.resolve().is_relative_to(Path(outside).resolve())
        except (OSError, RuntimeError):  # a symlink loop: reading it fails below
            inside = False
        if inside:
            raise DeidKeyError(f"the de-identification key file {path} lies inside the output folder {outside}; "
                               "keep it outside (copying the dataset would hand over the key).")
    if not os.path.lexists(path):
        if not create:
            raise DeidKeyError(f"no de-identification key file at {path}.")
        _create_key_file(path)
    return _read_key_file(path), str(path)


def _fingerprint_path(out: Path) -> Path:
    return out / FINGERPRINT_FILE


def recorded_fingerprint(out: str | os.PathLike) -> str | None:
    """The key fingerprint a prepared folder records, or None (none recorded, unreadable)."""
    try:
        return str(json.loads(_fingerprint_path(Path(out)).read_text())["key_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dataset_key(out: str | os.PathLike, key_file: str | os.PathLike | None = None, *,
                overwrite: bool = False) -> bytes:
    """The key to prepare ``out`` with (see the module docstring for where it comes from), after
    checking it belongs to that folder: a key file inside ``out`` is refused, a legacy in-dataset
    key (``.raymim_secret``) is refused unless ``overwrite`` (which deletes it), and a key whose
    fingerprint differs from the one ``out`` records is refused unless ``overwrite``. Records the
    fingerprint in ``out/deid.json`` (creating ``out``). Raises :class:`DeidKeyError`."""
    out = Path(out).resolve()
    legacy = out / SECRET_NAME
    if os.path.lexists(legacy):
        if not overwrite:
            home = default_key_file().parent
            raise DeidKeyError(
                f"{out} keeps its de-identification key inside the dataset ({SECRET_NAME}, written by an older "
                "raymim), so copying the dataset would hand over the key. Move it out and pass it, which keeps "
                f"the case ids: mkdir -p {home} && mv {legacy} {home}/{out.name}.key && raymim prepare ... "
                f"--deid-key {home}/{out.name}.key (or start over with --overwrite).")
        legacy.unlink()
    recorded = recorded_fingerprint(out)
    try:  # a new key is made only for a new dataset (a resume naming a missing file is a mistake)
        key, where = resolve_key(key_file, outside=out, create=recorded is None or overwrite)
    except DeidKeyError as exc:
        if recorded and "no de-identification key file" in str(exc):
            raise DeidKeyError(f"{exc} {out} was prepared with the key of fingerprint {recorded}: pass that key "
                               "(--deid-key FILE, $RAYMIM_DEID_KEY or $RAYMIM_DEID_KEY_FILE).") from None
        raise
    fingerprint = key_fingerprint(key)
    if recorded is not None and recorded != fingerprint and not overwrite:
        raise DeidKeyError(
            f"{out} was prepared with another de-identification key (fingerprint {recorded}; the key from {where} "
            f"has {fingerprint}). Resume with the same key (--deid-key FILE, ${KEY_ENV} or ${KEY_FILE_ENV}), "
            "or start over with --overwrite.")
    if recorded != fingerprint:
        from raymim.atomic import write_text_atomic

        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_fingerprint_path(out), json.dumps(
            {"key_fingerprint": fingerprint, "case_id": "HMAC-SHA256(key, content digest)[:20]",
             "note": "only the key's fingerprint: the key itself is kept outside the dataset"}, indent=1) + "\n")
    return key


def find_dataset_key(out: str | os.PathLike) -> bytes | None:
    """The key a prepared folder was made with, for recomputing its case ids (the pretraining
    overlap check): the first of ``$RAYMIM_DEID_KEY``, ``$RAYMIM_DEID_KEY_FILE`` / the per-user
    key file and a legacy ``.raymim_secret`` beside the shards whose fingerprint matches the one
    the folder records (any of them, in that order, when it records none). Never creates a key."""
    out = Path(out)
    candidates: list[bytes] = []
    if os.environ.get(KEY_ENV):
        candidates.append(os.environ[KEY_ENV].encode())
    for path in (os.environ.get(KEY_FILE_ENV), default_key_file(), out / SECRET_NAME, out.parent / SECRET_NAME):
        if path and Path(path).is_file():
            try:
                candidates.append(_read_key_file(Path(path)))
            except DeidKeyError:
                continue
    recorded = recorded_fingerprint(out)
    for key in candidates:
        if recorded is None or key_fingerprint(key) == recorded:
            return key
    return None


def deid_key(out_dir: str | os.PathLike | None) -> bytes:
    """The HMAC key. For an output folder, :func:`dataset_key`; without one (streaming from raw
    scans), ``$RAYMIM_DEID_KEY`` when set, else a key that lives only as long as this process."""
    if out_dir is not None:
        return dataset_key(out_dir)
    env = os.environ.get(KEY_ENV)
    return env.encode() if env else secrets.token_bytes(32)


# -- content digests and ids -----------------------------------------------------------------------


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


# -- reports ---------------------------------------------------------------------------------------

_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")
_EDGE_L, _EDGE_R = r"(?<![0-9A-Za-z\u00c0-\u024f])", r"(?![0-9A-Za-z\u00c0-\u024f])"
MIN_ID_CHARS, MIN_NAME_CHARS = 3, 2  # shorter values ("1", "A") would erase ordinary text


def _date_patterns(value: str) -> list[str]:
    """Regexes for a DICOM date (``YYYYMMDD``) as reports write it: 1970-01-02, 02.01.1970,
    01/02/70, 2 Jan 1970, January 2nd, 1970, ..."""
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", value.strip()[:8])
    if not m:
        return []
    y, mo, d = m.group(1), int(m.group(2)), int(m.group(3))
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return [re.escape(value.strip())]
    year = f"(?:{y}|{y[2:]})"
    day, month = f"0?{d}" if d < 10 else str(d), f"0?{mo}" if mo < 10 else str(mo)
    name = _MONTHS[mo - 1]
    mon = f"(?:{name}|{name[:3]}{'t?' if mo == 9 else ''}\\.?)"
    nth = r"(?:st|nd|rd|th)?"
    sep = r"[\s\-.,/]*"
    return [f"{y}{mo:02d}{d:02d}", f"{y}(?P<s>[-/.]){month}(?P=s){day}", f"{day}(?P<s>[-/.]){month}(?P=s){year}",
            f"{month}(?P<s>[-/.]){day}(?P=s){year}", f"{day}{nth}{sep}{mon}{sep}{y}", f"{mon}{sep}{day}{nth}{sep}{y}"]


def _loose(value: str) -> str:
    """A literal whose runs of spaces / punctuation match any such run ("DOE^JANE" ~ "Doe Jane")."""
    parts = [re.escape(p) for p in re.split(r"[\s^=,._\-/]+", value.strip()) if p]
    return r"[\s^=,._\-/]*".join(parts)


def scrub_report(text: str | None, identifiers: Mapping[str, Iterable[str]]) -> str | None:
    """``text`` with every identifier value replaced by ``[name]``, ``[id]``, ``[date]`` or
    ``[removed]``. ``identifiers`` maps ``"names"`` (DICOM person names, ``FAMILY^GIVEN^MIDDLE``:
    each part is removed on its own), ``"ids"``, ``"dates"`` (``YYYYMMDD``) and ``"other"``
    (institution names, addresses: each line) to their values. Case-insensitive, whole words."""
    if not text:
        return text
    rules: list[tuple[str, str]] = []
    for value in identifiers.get("dates", ()):
        rules += [(p, "[date]") for p in _date_patterns(str(value))]
    for value in identifiers.get("ids", ()):
        if len(value.strip()) >= MIN_ID_CHARS:
            rules.append((_loose(value), "[id]"))
    for value in identifiers.get("other", ()):
        for line in re.split(r"[\r\n]+", str(value)):
            if len(line.strip()) >= MIN_ID_CHARS:
                rules.append((_loose(line), "[removed]"))
    for value in identifiers.get("names", ()):
        full = str(value)
        if len(full.strip(" ^=")) >= MIN_NAME_CHARS:
            rules.append((_loose(full), "[name]"))
        groups = full.split("=")  # alphabetic, ideographic, phonetic representations
        for group in groups:
            comps = group.split("^")
            for comp in comps[:3]:  # family, given, middle (prefix / suffix are titles: "Dr", "Jr")
                rules += [(re.escape(w), "[name]") for w in re.split(r"[\s,.]+", comp) if len(w) >= MIN_NAME_CHARS]
    # Longest first, so "DOE^JANE" goes before "DOE" and a full date before its year.
    for pattern, token in sorted(set(rules), key=lambda r: -len(r[0])):
        if pattern:
            text = re.sub(_EDGE_L + f"(?:{pattern})" + _EDGE_R, token, text, flags=re.IGNORECASE)
    return text
