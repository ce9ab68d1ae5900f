"""Every rejection rule, case by case (no Ray), and the job-level quarantine + exit codes (Ray)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
from data_fixtures import BROKEN

from raymim.config import PrepareConfig
from raymim.data.worker import process_case
from raymim.io.discover import discover_cases

CFG = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2)


def _ctx() -> dict:
    return {"cfg": dataclasses.asdict(CFG), "key": "00" * 16, "config_hash": "t", "keep_paths": False}


def test_each_broken_input_is_rejected_with_its_reason(broken_corpus):
    cases = discover_cases(broken_corpus)
    reasons = {}
    for case in cases:
        status, volume = process_case(case, _ctx())
        assert status["status"] == "rejected" and volume is None
        reasons["escape" if case["rel"].startswith("..") else case["rel"]] = status["reason"]
    for name, expected in BROKEN.items():
        if name.startswith("dicom") and name not in reasons:
            continue  # shared data absent
        assert expected.lower() in reasons[name].lower(), (name, reasons[name])
        assert str(broken_corpus.parent) not in reasons[name]  # no paths in reasons


@pytest.mark.slow
def test_prepare_quarantines_and_exit_codes(ray_session, broken_corpus, phantoms, tmp_path):
    from raymim.data.pipeline import prepare

    # A manifest mixing good phantoms and the broken corpus (paths relative to a common root).
    root = Path(os.path.commonpath([phantoms.parent, broken_corpus.parent]))
    good = [f"{phantoms.parent.relative_to(root)}/{r['image']}" for r in csv.DictReader(open(phantoms))]
    corpus = broken_corpus.parent.relative_to(root)
    bad = [f"{corpus}/{line}" for line in broken_corpus.read_text().split()[1:]]
    manifest = root / "mixed.csv"
    manifest.write_text("image\n" + "\n".join(good + bad) + "\n")
    n_bad = len(bad)
    summary = prepare(manifest, tmp_path / "out", CFG, progress=False, max_rejected=1.0)
    assert summary["exit_code"] == 3
    assert summary["ok"] == len(good) and summary["rejected"] == n_bad
    rows = list(csv.DictReader(open(tmp_path / "out" / "quarantine.csv")))
    assert len(rows) == n_bad and all(r["reason"] and r["input"].startswith("#") for r in rows)
    manifest_json = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest_json["counts"]["rejected"] == n_bad
    # Same outputs, stricter limit: the job fails (exit 1) without redoing anything.
    again = prepare(manifest, tmp_path / "out", CFG, progress=False, max_rejected=0.1)
    assert again["exit_code"] == 1 and again["skipped"] == len(good) + n_bad
