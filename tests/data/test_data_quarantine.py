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


@pytest.mark.slow
def test_rerun_examines_added_and_changed_files_again(ray_session, tmp_path, monkeypatch):
    """A manifest row whose file was missing is examined again once the file is there; a file
    rejected for its content stays rejected (skipped) until its content changes."""
    import shutil

    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    monkeypatch.setenv("RAYMIM_DEID_KEY", "k")
    root = tmp_path / "in"
    generate_phantoms(root, cases=6, size=24, seed=7)
    images = root / "images"
    shutil.move(images / "case_00004.nii.gz", tmp_path / "later.nii.gz")  # listed, not there yet
    whole = (images / "case_00005.nii.gz").read_bytes()
    (images / "case_00005.nii.gz").write_bytes(whole[: len(whole) // 2])  # truncated: its content is bad
    manifest = root / "m.csv"
    manifest.write_text("image\n" + "".join(f"images/case_{i:05d}.nii.gz\n" for i in range(6)))
    out = tmp_path / "out"

    def reasons() -> list[str]:
        return [r["reason"] for r in csv.DictReader(open(out / "quarantine.csv"))]

    first = prepare(manifest, out, CFG, progress=False, max_rejected=1.0)
    assert first["ok"] == 4 and first["rejected"] == 2, first
    assert any("not found" in r for r in reasons()) and any("corrupt" in r or "truncated" in r for r in reasons())

    shutil.move(tmp_path / "later.nii.gz", images / "case_00004.nii.gz")
    second = prepare(manifest, out, CFG, progress=False)  # default max_rejected: 1 of 6 is fine
    assert second["ok"] == 5 and second["rejected"] == 1 and second["cases"] == 6, second
    assert second["skipped"] == 5 and second["exit_code"] == 3  # 4 volumes + the unchanged bad file
    assert len(reasons()) == 1 and "not found" not in reasons()[0]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["rejected"] == 1 and counts["ok"] == 5

    (images / "case_00005.nii.gz").write_bytes(whole)  # repaired: new content, examined again
    third = prepare(manifest, out, CFG, progress=False)
    assert third["exit_code"] == 0 and third["ok"] == 6 and third["rejected"] == 0 and third["skipped"] == 5, third
    assert reasons() == []
