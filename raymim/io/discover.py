"""Case discovery: folder / glob / CSV or JSONL manifest / MSD ``dataset.json`` -> case records.

A case record is a plain dict (it travels through Ray Data as JSON)::

    {"index": 0, "image": "/abs/path.nii.gz", "label": None | "/abs/...", "report": None | str,
     "domain": "site-a", "rel": "images/x.nii.gz", "error": None | "reason"}

``error`` is set for inputs that are known to be bad before reading (a manifest row whose file
is missing, a path escaping the manifest's folder); the pipeline quarantines them.

Folders are searched recursively: NIfTI / NRRD files are cases, and every folder holding DICOM
files (``.dcm`` or extension-less files with the ``DICM`` magic) is one series case. Files whose
names mark them as segmentations (``seg``, ``label``, ``mask`` as a name part, or inside a
``labelsTr``-style folder) are not images and are skipped.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from pathlib import Path
from typing import Any

from raymim.io.readers import DICOM_SUFFIXES, NIFTI_SUFFIXES, NRRD_SUFFIXES

_LABEL_NAME = re.compile(r"(^|[_\-.])(seg|segmentation|label|labels|mask)([_\-.]|$)", re.IGNORECASE)
_LABEL_DIR = re.compile(r"^labels", re.IGNORECASE)


def _is_dicom_file(path: Path) -> bool:
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _is_label_name(path: Path) -> bool:
    return bool(_LABEL_NAME.search(path.name)) or any(_LABEL_DIR.match(p) for p in path.parent.parts[-2:])


def _record(index: int, image: Path, root: Path, **extra: Any) -> dict[str, Any]:
    try:
        rel = str(image.relative_to(root))
    except ValueError:
        rel = image.name
    rec = {"index": index, "image": str(image), "label": None, "report": None, "domain": "default",
           "rel": rel, "error": None}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def _scan_folder(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        dicom = False
        for name in sorted(filenames):
            p = here / name
            low = name.lower()
            if name.startswith(".") or _is_label_name(p):
                continue
            if low.endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES):
                found.append(p)
            elif not dicom and _is_dicom_file(p):
                dicom = True
        if dicom:
            found.append(here)
    return found


def _inside(root: Path, raw: str) -> tuple[Path, str | None]:
    """Resolve a manifest path against its folder; error when it escapes or is missing."""
    path = (root / raw).resolve() if not os.path.isabs(raw) else Path(raw).resolve()
    if not path.is_relative_to(root):
        return path, "path escapes the manifest's root folder"
    if not path.exists():
        return path, "file listed in manifest not found"
    return path, None


def _from_rows(rows: list[dict[str, Any]], root: Path, default_domain: str) -> list[dict[str, Any]]:
    cases = []
    for i, row in enumerate(rows):
        raw = row.get("image")
        if not raw:
            cases.append(_record(i, root / f"<row {i}>", root, error="manifest row without an image"))
            continue
        image, err = _inside(root, str(raw))
        label, lerr = (None, None)
        if row.get("label"):
            label, lerr = _inside(root, str(row["label"]))
        domain = row.get("domain") or row.get("dataset") or default_domain
        rec = _record(i, image, root, report=row.get("report") or None, domain=str(domain),
                      label=str(label) if label else None, error=err or (lerr and f"label: {lerr}"))
        rec["rel"] = str(raw)
        # Downstream only (splits): the side a case is fixed to, and the patient that groups cases.
        # Neither is written into prepared shards.
        rec["split"] = str(row["split"]).strip().lower() if row.get("split") else None
        patient = row.get("patient") or row.get("patient_id")
        rec["patient"] = str(patient).strip() if patient not in (None, "") else None
        cases.append(rec)
    return cases


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "image" not in rows[0]:
            raise ValueError(f"manifest {path.name} should have an 'image' column, got {list(rows[0])}.")
        return rows
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"manifest {path.name} line {n} is not JSON: {exc.msg}.") from None
    return rows


def _read_msd(path: Path) -> list[dict[str, Any]]:
    spec = json.loads(path.read_text())
    domain = str(spec.get("name") or path.parent.name)
    rows = [dict(r, domain=domain) for r in spec.get("training", [])]
    rows += [{"image": r if isinstance(r, str) else r["image"], "domain": domain} for r in spec.get("test", [])]
    return rows


def discover_cases(input: str | os.PathLike) -> list[dict[str, Any]]:
    """List the cases of a folder, a glob, a CSV / JSONL manifest or an MSD ``dataset.json``.

    Raises ``ValueError`` when the input itself is unusable (missing, unknown kind, no cases).
    """
    text = str(input)
    path = Path(text).expanduser()
    if any(c in text for c in "*?[") and not path.exists():
        files = [Path(p).resolve() for p in sorted(glob.glob(text, recursive=True))]
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path.cwd()
        images = [f for f in files if f.is_dir() or f.name.lower().endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES)]
        cases = [_record(i, f, root) for i, f in enumerate(images)]
    elif path.is_dir():
        root = path.resolve()
        cases = [_record(i, f, root) for i, f in enumerate(_scan_folder(root))]
    elif path.is_file() and path.name.lower().endswith((".csv", ".jsonl")):
        cases = _from_rows(_read_manifest(path), path.parent.resolve(), path.parent.name)
    elif path.is_file() and path.suffix.lower() == ".json":
        cases = _from_rows(_read_msd(path), path.parent.resolve(), path.parent.name)
    elif path.is_file():
        cases = [_record(0, path.resolve(), path.parent.resolve())]
    else:
        raise ValueError(f"input should be a folder, glob, manifest or dataset.json, got {text!r}.")
    if not cases:
        raise ValueError(f"no images found in {text!r}.")
    return cases
