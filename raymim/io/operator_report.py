"""The operator report of ``raymim prepare``: where every input that did not become a volume is, and why.

The dataset (``--out``: ``shards/``, ``manifest.json``, ``quarantine.csv``, ``deid.json``) never
names an input: it lists case ids and path-free reasons only, so it can be copied or shared as it
is. The operator report is the other half, for the people who run prepare: one CSV row per
rejected case, per file that is not an image (an RTSTRUCT, a README, a FIFO, ...) and per
duplicate, with

``kind`` (``rejected`` / ``not an image`` / ``duplicate``), ``case_id`` (joins ``quarantine.csv``
and ``manifest.json``; empty for files that never were cases), ``path`` (absolute, as found),
``input`` (relative to the input root or as the manifest wrote it), ``reason`` (the same path-free
text the dataset holds) and ``detail`` (the message of an unexpected error, which may quote paths).

It names patients' folders, so it is **not part of the dataset** and is written outside it: by
default beside the output folder, ``<out>.operator-report.csv`` (``/data/ds`` ->
``/data/ds.operator-report.csv``), or where ``--report FILE`` says; a report path inside
``--out`` is refused. Mode 0600. Every run rewrites it to describe the dataset as it now is: its
rejected rows are exactly the rejections ``quarantine.csv`` and ``manifest.json`` list (the cases
of this run's input, rejected by this run or, unchanged since, by an earlier one); a rejection of
an input that was since fixed, replaced or removed is gone from all three. ``detail`` is known
only for cases examined by this run.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Any

from raymim.atomic import write_text_atomic
from raymim.io.manifests import printable

COLUMNS = ("kind", "case_id", "path", "input", "reason", "detail")
SUFFIX = ".operator-report.csv"


def report_path(out: str | os.PathLike, report: str | os.PathLike | None = None) -> Path:
    """Where the operator report of output folder ``out`` goes: ``report``, else
    ``<out>.operator-report.csv`` beside it. Raises ``ValueError`` for a path inside ``out``."""
    out = Path(out).expanduser().resolve()
    path = Path(report).expanduser().resolve() if report else out.parent / f"{out.name}{SUFFIX}"
    if path.is_relative_to(out):
        raise ValueError(f"the operator report {path} would lie inside the dataset {out}; it names input paths, "
                         "so it must be written outside (--report FILE elsewhere).")
    return path


def _case_path(case: dict[str, Any]) -> str:
    return printable(str(case.get("image") or ""))


def report_rows(found: Any, statuses: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The report's rows from discovery (``found``: :class:`raymim.io.discover.Discovery`), this
    run's status records (``index``, ``case_id``, ``detail``) and the rejections the dataset now
    lists (``rejected``: the manifest's rejected case records, each a case of this run's input)."""
    cases = found.cases
    index_of = {s["case_id"]: s["index"] for s in statuses if s.get("case_id")}
    detail_of = {s["case_id"]: s.get("detail") for s in statuses if s.get("case_id")}
    rows = []
    for c in sorted(rejected, key=lambda c: index_of.get(c["case_id"], 1 << 30)):
        cid = c["case_id"]
        case = cases[index_of[cid]] if cid in index_of else None
        rows.append({"kind": "rejected", "case_id": cid, "path": _case_path(case) if case else "",
                     "input": case["rel"] if case else "", "reason": c.get("reason") or "",
                     "detail": detail_of.get(cid) or ""})
    for rec in found.skipped:
        rows.append({"kind": "not an image", "case_id": "", "path": rec.get("path", ""), "input": rec["rel"],
                     "reason": rec["reason"], "detail": ""})
    for rec in found.duplicates:
        kept = cases[rec["duplicate_of"]]["rel"] if 0 <= rec["duplicate_of"] < len(cases) else ""
        rows.append({"kind": "duplicate", "case_id": "", "path": rec.get("path", ""), "input": rec["rel"],
                     "reason": rec["reason"], "detail": f"written once, as {kept}" if kept else ""})
    return rows


def write_operator_report(path: str | os.PathLike, found: Any, statuses: list[dict[str, Any]],
                          rejected: list[dict[str, Any]]) -> str | None:
    """Write the report (atomically, mode 0600) and name it on stderr; returns its path, or None
    (with a warning) when it cannot be written: the dataset is complete either way."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    rows = report_rows(found, statuses, rejected)
    writer.writerows(rows)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, buf.getvalue())
        os.chmod(path, 0o600)
    except OSError as exc:
        print(f"raymim prepare: could not write the operator report {path} ({type(exc).__name__}); "
              "pass --report FILE", file=sys.stderr)
        return None
    print(f"operator report ({len(rows)} rejected / skipped inputs, with their paths; not part of the dataset): "
          f"{path}", file=sys.stderr)
    return str(path)
