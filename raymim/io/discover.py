"""Case discovery: folder / glob / CSV or JSONL manifest / MSD ``dataset.json`` -> case records.

A case record is a plain dict (it travels through Ray Data as JSON)::

    {"index": 0, "image": "/abs/path.nii.gz", "label": None | "/abs/...", "report": None | str,
     "domain": None | "site-a", "rel": "images/x.nii.gz", "error": None | "reason"}

plus, for a DICOM series that shares its folder with other image series, ``"series_files"``:
the names of its slices inside the ``image`` folder (:func:`case_input` turns a record into what
the reader and the hasher take). Manifest rows also carry ``split`` and ``patient``.

``error`` is set for inputs that are known to be bad before reading (a manifest row whose file
is missing, a path escaping the input root, a FIFO or device, a symlink loop); the pipeline
quarantines them. :func:`discover` also returns what is *not* a case: ``skipped`` files (a README,
an RTDOSE / SR next to a series, an RTSTRUCT / SEG that refers to none of its folder's series, a
file named like a label) and ``duplicates``
(the same scan listed twice: the same file through a symlink or by a relative and an absolute
path, or a byte-identical copy), each ``{"rel", "reason"}`` (duplicates also ``duplicate_of``, the
``index`` of the case kept) and ``path`` (absolute). Reasons are short sentences without paths or
header values; ``rel`` (the path relative to the input root, non-UTF-8 bytes replaced) and
``path`` are for the operator only (the console and :mod:`raymim.io.operator_report`, outside the
dataset).

Folders are searched recursively. NIfTI / NRRD files are cases by name; every other file is
examined by *content*: DICOM files (by their ``DICM`` marker, whatever they are called) are
grouped by ``SeriesInstanceUID`` into one case per image series (:mod:`raymim.io.dicom`); an
RTSTRUCT or DICOM-SEG in the folder that refers to one of them (by series, SOP instance or frame
of reference UID) becomes that case's ``label`` (:mod:`raymim.io.dicom_labels` rasterises it).
NIfTI / NRRD files whose names mark them as segmentations (``seg``, ``label``, ``mask`` as a name
part, or inside a ``labelsTr``-style folder) are skipped. Domains are never taken from folder
or file names (a folder named after a patient would reach every shard): only from an explicit
``domain`` / ``dataset`` column, the ``name`` of a ``dataset.json``, or the ``domain`` argument.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymim.io.checks import CaseRejected, open_regular, regular_file
from raymim.io.deid import content_digest
from raymim.io.dicom import scan_files
from raymim.io.manifests import ManifestError, cell, printable, read_manifest, read_msd
from raymim.io.readers import NIFTI_SUFFIXES, NRRD_SUFFIXES, volume_files

_LABEL_NAME = re.compile(r"(^|[_\-.])(seg|segmentation|label|labels|mask)([_\-.]|$)", re.IGNORECASE)
_LABEL_DIR = re.compile(r"^labels", re.IGNORECASE)
_VOLUME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES


@dataclass
class Discovery:
    """What :func:`discover` found: ``cases`` (records, ``index`` = position), ``skipped`` files and
    ``duplicates`` (``{"rel", "path", "reason"}`` each; duplicates add ``duplicate_of``)."""

    cases: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = path.name
    return printable(rel)


def _skip(path: Path, root: Path, reason: str) -> dict[str, str]:
    """A skipped-file record: ``rel`` and ``path`` (operator only), ``reason`` (no path, no header value)."""
    return {"rel": _rel(path, root), "path": printable(str(path)), "reason": reason}


def _is_label_name(path: Path) -> bool:
    return bool(_LABEL_NAME.search(path.name)) or any(_LABEL_DIR.match(p) for p in path.parent.parts[-2:])


def _record(index: int, image: Path, root: Path, **extra: Any) -> dict[str, Any]:
    rec = {"index": index, "image": str(image), "label": None, "report": None, "domain": None,
           "rel": _rel(image, root), "error": None}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def case_input(case: dict[str, Any], key: str = "image") -> str | list[str] | None:
    """What to hand to :class:`~raymim.io.readers.VolumeReader` / ``LoadImage`` and to
    :func:`~raymim.io.deid.content_digest` for ``case[key]``: the slice files of a DICOM series
    that shares its folder (``series_files``), else the path itself."""
    path = case.get(key)
    if key == "image" and path and case.get("series_files"):
        return [os.path.join(path, name) for name in case["series_files"]]
    return path


def digest_input(case: dict[str, Any], key: str = "image") -> str | list[str] | None:
    """What :func:`~raymim.io.deid.content_digest` hashes for ``case[key]``: :func:`case_input`,
    with a detached NRRD header's data file beside the header (:func:`~raymim.io.readers.volume_files`)."""
    x = case_input(case, key)
    if isinstance(x, str | os.PathLike) and str(x).lower().endswith(".nhdr"):
        return [str(f) for f in volume_files(x)]
    return x


def _problem(path: Path, root: Path) -> str | None:
    """Why a would-be case file cannot be read at all (outside the root, not a regular file)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return "symlink loop: the path never resolves to a file"
    if not resolved.is_relative_to(root):
        return "path escapes the input root (a symlink or ../ pointing elsewhere)"
    try:
        regular_file(path)
    except CaseRejected as exc:
        return str(exc)
    return None


# -- folders ---------------------------------------------------------------------------------------


_DATA_FILE = re.compile(rb"^data ?file:[ \t]*(\S[^\r\n]*?)[ \t]*\r?$", re.MULTILINE | re.IGNORECASE)


def _detached_data(header: Path) -> str | None:
    """The name of the data file a detached NRRD header (``.nhdr``) names in its own folder (the
    reader refuses any other), so a folder scan does not report it as a stray file."""
    try:
        with open_regular(header) as f:
            m = _DATA_FILE.search(f.read(1 << 16))
    except (CaseRejected, OSError):
        return None
    name = os.fsdecode(m.group(1)) if m else None
    return name if name and "/" not in name and "\\" not in name else None


def _scan_folder(root: Path, cases: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        others: list[Path] = []
        data_files = {_detached_data(here / n) for n in filenames if n.lower().endswith(".nhdr")}
        for name in sorted(filenames):
            p = here / name
            if name.startswith(".") or name in data_files:
                continue
            if name.lower().endswith(_VOLUME_SUFFIXES):
                if _is_label_name(p):
                    skipped.append(_skip(p, root, "named like a label file (seg / label / mask)"))
                    continue
                cases.append(_record(len(cases), p, root, error=_problem(p, root)))
                continue
            why = _problem(p, root)
            if why:
                skipped.append(_skip(p, root, why))
            else:
                others.append(p)
        if others:
            _dicom_cases(here, root, others, cases, skipped)


def _dicom_cases(folder: Path, root: Path, files: list[Path], cases: list[dict[str, Any]],
                 skipped: list[dict[str, Any]]) -> None:
    scan = scan_files(files, folder=folder)
    # An RTSTRUCT / DICOM-SEG that refers to one of the folder's image series is that case's label
    # (the first by name when several refer to one series; the others stay skipped, with why).
    label_of: dict[str, Path] = {}
    extra: dict[Path, str] = {}
    for f, uid in sorted(scan.labels, key=lambda fu: fu[0].name):
        if uid is None:
            extra[f] = "; it refers to no single image series of its folder"
        elif uid in label_of:
            extra[f] = "; another label object of the same image series is used"
        else:
            label_of[uid] = f
    used = set(label_of.values())
    for f, why in scan.skipped:
        if f not in used:
            skipped.append(_skip(f, root, why + extra.get(f, "")))
    if len(scan.series) == 1:
        # One image series: the folder is the case; the reader sets the other objects aside itself
        # (and rejects the series when one of its slices is unreadable).
        label = label_of.get(next(iter(scan.series)))
        cases.append(_record(len(cases), folder, root, label=str(label) if label else None))
    elif scan.series:
        for n, uid in enumerate(sorted(scan.series, key=lambda u: sorted(scan.series[u])[0])):
            names = sorted(f.name for f in scan.series[uid])
            label = label_of.get(uid)
            rec = _record(len(cases), folder, root, series_files=names, label=str(label) if label else None)
            rec["rel"] = f"{rec['rel']} (series {n + 1} of {len(scan.series)})"
            cases.append(rec)
        for f, why in scan.broken:
            skipped.append(_skip(f, root, f"{why}; not part of any series read"))
    elif scan.broken:
        cases.append(_record(len(cases), folder, root, error=f"no readable DICOM image series ({scan.broken[0][1]})"))


# -- manifests -------------------------------------------------------------------------------------


def _inside(root: Path, raw: str) -> tuple[Path, str | None]:
    """Resolve a manifest path against its folder; error when it escapes, loops or is missing."""
    path = Path(raw) if os.path.isabs(raw) else root / raw
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return path, "symlink loop: the path never resolves to a file"
    if not resolved.is_relative_to(root):
        return resolved, "path escapes the manifest's root folder"
    if not os.path.lexists(path) or not resolved.exists():
        return resolved, "file listed in manifest not found"
    if not resolved.is_dir():
        try:
            regular_file(resolved)
        except CaseRejected as exc:
            return resolved, str(exc)
    return resolved, None


def _from_rows(rows: list[tuple[str, dict[str, Any]]], root: Path, domain: str | None,
               domain_column: str | None = None) -> list[dict[str, Any]]:
    if domain_column is not None and not any(domain_column in row for _, row in rows):
        raise ValueError(f"the manifest has no column {printable(domain_column)!r} (--domain-column).")
    cases = []
    for i, (where, row) in enumerate(rows):
        raw, bad = cell(row, "image")
        if raw is None:
            rec = _record(i, root / f"<{where}>", root, error=bad or "manifest row without an image")
            rec["rel"] = where
            cases.append(rec)
            continue
        image, err = _inside(root, raw)
        label, lerr = (None, None)
        raw_label, bad_label = cell(row, "label")
        if raw_label:
            label, lerr = _inside(root, raw_label)
        report, bad_report = cell(row, "report")
        dom, bad_domain = cell(row, domain_column if domain_column is not None else
                               "domain" if row.get("domain") not in (None, "") else "dataset")
        error = err or (lerr and f"label: {lerr}") or bad_label or bad_report or bad_domain
        rec = _record(i, image, root, report=report, domain=dom or domain,
                      label=str(label) if label else None, error=error)
        rec["rel"] = printable(raw)
        # Downstream only (splits): the side a case is fixed to, and the patient that groups cases.
        # Neither is written into prepared shards.
        rec["split"] = str(row["split"]).strip().lower() if row.get("split") not in (None, "") else None
        patient = row.get("patient") if row.get("patient") not in (None, "") else row.get("patient_id")
        rec["patient"] = str(patient).strip() if patient not in (None, "") else None
        cases.append(rec)
    return cases


# -- duplicates ------------------------------------------------------------------------------------


def _members(case: dict[str, Any]) -> list[Path]:
    image = digest_input(case)
    if isinstance(image, list):
        return [Path(p) for p in image]
    p = Path(image)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.is_file())
    return [p]


def _identity(case: dict[str, Any]) -> tuple:
    """The same file(s) however they are reached: (device, inode) of image and label files."""
    ids = []
    for key in ("image", "label"):
        inp = case_input(case, key)
        if inp is None:
            ids.append(None)
            continue
        p = Path(inp[0]).parent if isinstance(inp, list) else Path(inp)
        st = os.stat(p)
        ids.append((st.st_dev, st.st_ino, tuple(case.get("series_files") or ()) if key == "image" else ()))
    return tuple(ids)


def _fingerprint(case: dict[str, Any], n: int = 1 << 16) -> str:
    """Sizes + first and last 64 KB of up to three member files: equal for byte-identical inputs,
    almost always different otherwise; the full digest settles ties."""
    h = hashlib.sha256()
    for key in ("image", "label"):
        if case.get(key) is None:
            h.update(b"-")
            continue
        files = _members(case) if key == "image" else [Path(case["label"])]
        picks = files if len(files) <= 3 else [files[0], files[len(files) // 2], files[-1]]
        h.update(f"{len(files)}|{sum(f.stat().st_size for f in files)}|".encode())
        for f in picks:
            with open_regular(f) as fh:
                h.update(fh.read(n))
                size = os.fstat(fh.fileno()).st_size
                if size > 2 * n:
                    fh.seek(size - n)
                    h.update(fh.read(n))
    return h.hexdigest()


def _size_key(case: dict[str, Any]) -> tuple:
    files = _members(case)
    label = os.stat(case["label"]).st_size if case.get("label") else None
    return len(files), sum(os.stat(f).st_size for f in files), label


def _dedupe(cases: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep the first of each group of identical inputs: the same files (device and inode), or
    byte-identical content. Only inputs of equal sizes are read (64 KB fingerprints first, then
    the full digest), so a corpus without copies costs one ``stat`` per file."""
    keep: list[dict[str, Any]] = []
    dups: list[tuple[dict[str, Any], dict[str, Any], str]] = []
    by_identity: dict[tuple, dict[str, Any]] = {}
    by_size: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    cache: dict[tuple[int, str], str] = {}

    def _cached(case: dict[str, Any], kind: str) -> str:
        if (id(case), kind) not in cache:
            cache[(id(case), kind)] = _fingerprint(case) if kind == "print" else \
                content_digest(digest_input(case), digest_input(case, "label"))
        return cache[(id(case), kind)]

    for case in cases:
        if case.get("error"):
            keep.append(case)
            continue
        try:
            ident, size = _identity(case), _size_key(case)
        except (CaseRejected, OSError):  # unreadable: the reader says why
            keep.append(case)
            continue
        twin, why = by_identity.get(ident), "the same file listed twice (symlink, or relative and absolute path)"
        if twin is None and size[1] > 0:
            why = "a byte-identical copy of another case"
            for other in by_size[size]:
                try:
                    if _cached(other, "print") == _cached(case, "print") and \
                            _cached(other, "digest") == _cached(case, "digest"):
                        twin = other
                        break
                except (CaseRejected, OSError):
                    continue
        if twin is not None:
            dups.append((case, twin, why))
            continue
        by_identity[ident] = case
        by_size[size].append(case)
        keep.append(case)
    for i, case in enumerate(keep):
        case["index"] = i
    return keep, [{"rel": c["rel"], "path": printable(c["image"]), "duplicate_of": kept["index"], "reason": why}
                  for c, kept, why in dups]


# -- entry points ----------------------------------------------------------------------------------


def discover(input: str | os.PathLike, *, domain: str | None = None, dedupe: bool = True,
             domain_column: str | None = None) -> Discovery:
    """Cases, skipped files and duplicates of a folder, a glob, a CSV / JSONL manifest or an MSD
    ``dataset.json`` (see the module docstring). ``domain`` applies to cases without an explicit
    one; ``domain_column`` names the manifest column that holds the domains (instead of
    ``domain`` / ``dataset``; a ``ValueError`` when the input is no manifest or lacks it).

    Raises :class:`ManifestError` (a ``ValueError``) for a malformed manifest, naming the row, and
    ``ValueError`` when the input itself is unusable (missing, unknown kind, no cases).
    """
    text = str(input)
    path = Path(text).expanduser()
    skipped: list[dict[str, Any]] = []
    if any(c in text for c in "*?[") and not os.path.lexists(path):
        files = [Path(os.path.abspath(p)) for p in sorted(glob.glob(text, recursive=True))]
        root = Path(os.path.commonpath([str(f.parent) for f in files])).resolve() if files else Path.cwd()
        images = [f for f in files if f.is_dir() or f.name.lower().endswith(_VOLUME_SUFFIXES)]
        cases = [_record(i, f, root, error=None if f.is_dir() else _problem(f, root)) for i, f in enumerate(images)]
    elif path.is_dir():
        root = path.resolve()
        cases = []
        _scan_folder(root, cases, skipped)
    elif path.is_file() and path.name.lower().endswith((".csv", ".jsonl")):
        cases = _from_rows(read_manifest(path), path.parent.resolve(), domain, domain_column)
    elif path.is_file() and path.suffix.lower() == ".json":
        rows, name = read_msd(path)
        cases = _from_rows(rows, path.parent.resolve(), domain or name, domain_column)
    elif os.path.lexists(path):  # one file, whatever its kind: the reader says what is wrong with it
        root = path.parent.resolve()
        cases = [_record(0, root / path.name, root, error=_problem(path, root))]
    else:
        raise ValueError(f"input should be a folder, glob, manifest or dataset.json, got {printable(text)!r}.")
    if domain_column is not None and not (path.is_file() and path.name.lower().endswith((".csv", ".jsonl", ".json"))):
        raise ValueError("--domain-column needs a manifest (.csv / .jsonl / dataset.json) as the input.")
    if domain is not None:
        for c in cases:
            c["domain"] = c.get("domain") or domain
    duplicates: list[dict[str, Any]] = []
    if dedupe:
        cases, duplicates = _dedupe(cases)
    if not cases:
        raise ValueError(f"no images found in {printable(text)!r}.")
    return Discovery(cases, skipped, duplicates)


def discover_cases(input: str | os.PathLike, *, domain: str | None = None) -> list[dict[str, Any]]:
    """The case records of :func:`discover` (duplicates removed; skipped files are not cases).

    Raises ``ValueError`` when the input itself is unusable (missing, unknown kind, no cases) and
    :class:`ManifestError` for a malformed manifest.
    """
    return discover(input, domain=domain).cases


__all__ = ["Discovery", "ManifestError", "case_input", "discover", "discover_cases", "printable"]
