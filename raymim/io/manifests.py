"""Manifest parsing: CSV (a byte-order mark is fine), JSONL and MSD ``dataset.json`` -> rows.

Each row comes back as ``(where, {column: value})`` with ``where`` naming it for messages
("line 3", "dataset.json training[2]"). A manifest that cannot be parsed at all raises
:class:`ManifestError` naming the row; a row whose cells are unusable (an ``image`` or ``report``
that is a number or an object, an entry without ``image``) is returned as is and fails alone
later (:func:`cell` says why). Messages never quote cell values.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from raymim.io.checks import CaseRejected, open_regular


class ManifestError(ValueError):
    """A manifest (CSV / JSONL / ``dataset.json``) that cannot be read; the message names the row.
    A ``ValueError``, so ``raymim prepare`` turns it into a one-line config error (exit 2)."""


def printable(text: str) -> str:
    """``text`` with undecodable bytes of a non-UTF-8 file name (surrogate escapes) replaced."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def cell(row: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    """(text or None, error): a manifest cell must be text (or empty); numbers, lists and objects
    make their row fail alone."""
    value = row.get(key)
    if value is None or value == "":
        return None, None
    if not isinstance(value, str):
        kind = {int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object"}
        return None, f"manifest '{key}' should be text, got {kind.get(type(value), type(value).__name__)}"
    return value, None


def _read_text(path: Path) -> str:
    try:
        with open_regular(path) as f:
            data = f.read()
    except (CaseRejected, OSError) as exc:
        raise ManifestError(f"manifest {printable(path.name)} cannot be read ({type(exc).__name__}).") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {printable(path.name)} is not UTF-8 text (byte {exc.start}).") from None


def read_manifest(path: Path) -> list[tuple[str, dict[str, Any]]]:
    name = printable(path.name)
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [(f or "").strip() for f in reader.fieldnames or []]
        if "image" not in fields:
            raise ManifestError(f"manifest {name} should have an 'image' column, got {fields}.")
        reader.fieldnames = fields
        rows = []
        for row in reader:
            if None in row:
                raise ManifestError(f"manifest {name} line {reader.line_num}: more cells than columns.")
            rows.append((f"line {reader.line_num}", row))
        return rows
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest {name} line {n} is not JSON: {exc.msg}.") from None
        if not isinstance(value, dict):
            raise ManifestError(f"manifest {name} line {n} should be a JSON object, got {type(value).__name__}.")
        rows.append((f"line {n}", value))
    return rows


def read_msd(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    name = printable(path.name)
    try:
        spec = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{name} is not JSON: {exc.msg} (line {exc.lineno}).") from None
    if not isinstance(spec, dict):
        raise ManifestError(f"{name} should be a JSON object with 'training' / 'test' lists, "
                            f"got {type(spec).__name__}.")
    rows = []
    for part in ("training", "test"):
        entries = spec.get(part) or []
        if not isinstance(entries, list):
            raise ManifestError(f"{name}: '{part}' should be a list, got {type(entries).__name__}.")
        for j, r in enumerate(entries):
            where = f"{part}[{j}]"
            if isinstance(r, str):
                r = {"image": r}
            if not isinstance(r, dict):
                raise ManifestError(f"{name} {where} should be an object or a path, got {type(r).__name__}.")
            rows.append((f"{name} {where}", r if part == "training" else {"image": r.get("image")}))
    dataset = spec.get("name")
    return rows, (str(dataset) if isinstance(dataset, str | int | float) and str(dataset) else None)
