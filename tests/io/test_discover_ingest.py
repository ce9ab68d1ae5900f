"""Discovery of what scanners and archives export: DICOM by content, study folders, malformed
manifests, non-UTF-8 names, symlinks, duplicates, and domains that never come from folder names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_fixtures import BASIC_SR, GSPS, RTDOSE, RTSTRUCT, write_object, write_series

from raymim.io.deid import content_digest
from raymim.io.discover import ManifestError, case_input, discover, discover_cases
from raymim.io.readers import VolumeReader

TS = "totalsegmentator"


def _nifti(path: Path, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).normal(0, 100, (8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _read(case: dict) -> np.ndarray:
    reader = VolumeReader()
    return reader.get_data(reader.read(case_input(case)))[0]


def test_shared_series_named_by_uid_found_by_content(shared_data, tmp_path):
    series = shared_data / TS / "example_ct_dicom"
    assert all("." in p.name and not p.name.endswith(".dcm") for p in series.iterdir())  # names like CT.1.3.12...
    # --input on the series folder itself, and the series inside a folder scan
    cases = discover_cases(series)
    assert len(cases) == 1 and cases[0]["image"] == str(series) and cases[0]["error"] is None
    scan = discover(shared_data / TS)
    assert [c["rel"] for c in scan.cases if c["rel"] == "example_ct_dicom"] == ["example_ct_dicom"]
    assert _read(cases[0]).shape == (512, 512, 20)


def test_study_folder_one_case_per_series_and_objects_skipped(tmp_path):
    study = tmp_path / "study"
    a = write_series(study, n=6, seed=1)
    b = write_series(study, n=5, seed=2, step=2.0)
    write_object(study, RTSTRUCT, "RTSTRUCT", "RS.")
    write_object(study, RTDOSE, "RTDOSE", "RD.")
    write_object(study, BASIC_SR, "SR", "SR.")
    write_object(study, GSPS, "PR", "PR.")
    (study / "README").write_text("exported by PACS\n")
    (study / "notes.dcm").write_text("not dicom despite the name\n")
    found = discover(tmp_path)
    assert len(found.cases) == 2 and not any(c["error"] for c in found.cases)
    assert sorted(len(c["series_files"]) for c in found.cases) == [5, 6]
    assert sorted(_read(c).shape[2] for c in found.cases) == [5, 6]
    reasons = {s["rel"].split("/")[-1].split(".")[0]: s["reason"] for s in found.skipped}
    assert "RT structure set" in reasons["RS"] and "RT dose" in reasons["RD"]
    assert "structured report" in reasons["SR"] and "presentation state" in reasons["PR"]
    assert reasons["README"] == "not a DICOM file" and reasons["notes"] == "not a DICOM file"
    for s in found.skipped:  # reasons carry no paths or header values
        assert str(tmp_path) not in s["reason"] and "DOE" not in s["reason"] and "PID" not in s["reason"]
    # Hashing follows the series' own files: the two cases get different digests.
    assert len({content_digest(case_input(c)) for c in found.cases}) == 2
    assert {Path(p).name for c in found.cases for p in case_input(c)} == {p.name for p in a + b}


def test_series_folder_with_rtstruct_and_readme_reads_as_one_case(tmp_path):
    folder = tmp_path / "series"
    write_series(folder, n=6)
    write_object(folder, RTSTRUCT, "RTSTRUCT", "RS.")
    (folder / "README.txt").write_text("hello")
    cases = discover_cases(folder)
    assert len(cases) == 1 and "series_files" not in cases[0]
    assert _read(cases[0]).shape == (16, 16, 6)  # the reader sets the RTSTRUCT and README aside


def test_domain_never_from_folder_names(tmp_path):
    site = tmp_path / "DOE_JANE_1961"
    site.mkdir()
    _nifti(site / "ct.nii.gz")
    (site / "m.csv").write_text("image\nct.nii.gz\n")
    (site / "dataset.json").write_text(json.dumps({"training": [{"image": "ct.nii.gz"}]}))
    for src in (site / "m.csv", site / "dataset.json", site):
        for case in discover_cases(src):
            assert case["domain"] is None and "DOE" not in json.dumps({k: v for k, v in case.items()
                                                                       if k not in ("image", "rel")})
    (site / "d.csv").write_text("image,domain\nct.nii.gz,site-a\n")
    assert discover_cases(site / "d.csv")[0]["domain"] == "site-a"
    assert discover_cases(site / "m.csv", domain="scanner-2")[0]["domain"] == "scanner-2"
    (site / "named.json").write_text(json.dumps({"name": "Task03", "training": [{"image": "ct.nii.gz"}]}))
    assert discover_cases(site / "named.json")[0]["domain"] == "Task03"


def test_malformed_manifests_name_the_row(tmp_path):
    _nifti(tmp_path / "a.nii.gz")
    cases = [("m.jsonl", '{"image": "a.nii.gz"}\n["a.nii.gz"]\n', "line 2 should be a JSON object"),
             ("m2.jsonl", '{"image": "a.nii.gz"}\n{"image": \n', "line 2 is not JSON"),
             ("dataset.json", json.dumps([{"image": "a.nii.gz"}]), "should be a JSON object"),
             ("d2.json", json.dumps({"training": {"image": "a.nii.gz"}}), "'training' should be a list"),
             ("d3.json", json.dumps({"test": [42]}), r"test\[0\] should be an object"),
             ("m.csv", "path,label\na.nii.gz,\n", "should have an 'image' column"),
             ("bad.csv", b"image\n\xff\xfe.nii\n", "not UTF-8")]
    for name, text, message in cases:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ManifestError, match=message) as info:
            discover_cases(path)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_bad_rows_fail_alone(tmp_path):
    _nifti(tmp_path / "a.nii.gz")
    _nifti(tmp_path / "b.nii.gz", seed=1)
    lines = [{"image": "a.nii.gz", "report": 42}, {"image": "a.nii.gz", "report": {"text": "x"}},
             {"image": "b.nii.gz", "report": "no findings"}, {"label": "a.nii.gz"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cases = discover(tmp_path / "m.jsonl", dedupe=False).cases
    assert [c["error"] for c in cases] == ["manifest 'report' should be text, got a number",
                                           "manifest 'report' should be text, got an object", None,
                                           "manifest row without an image"]
    assert cases[2]["report"] == "no findings"
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "T", "training": [{"image": "a.nii.gz"}],
                                                        "test": [{"label": "a.nii.gz"}, "b.nii.gz"]}))
    msd = discover_cases(tmp_path / "dataset.json")
    assert [c["error"] for c in msd] == [None, "manifest row without an image", None]


def test_csv_with_byte_order_mark(tmp_path):
    _nifti(tmp_path / "a.nii.gz")
    (tmp_path / "m.csv").write_bytes("\ufeffimage,report\r\na.nii.gz,ok\r\n".encode())
    (case,) = discover_cases(tmp_path / "m.csv")
    assert case["error"] is None and case["report"] == "ok" and case["image"].endswith("a.nii.gz")


def test_non_utf8_name_and_symlink_loop(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    weird = os.fsdecode(b"scan_\xe9\xff.nii.gz")
    _nifti(root / weird)
    os.symlink(root / "loop1.nii.gz", root / "loop2.nii.gz")
    os.symlink(root / "loop2.nii.gz", root / "loop1.nii.gz")
    found = discover(root)
    by_rel = {c["rel"]: c for c in found.cases}
    good = next(c for rel, c in by_rel.items() if rel.startswith("scan_"))
    assert good["error"] is None and "\ufffd" in good["rel"]
    json.dumps(good["rel"]).encode("utf-8")  # printable: the console and reports can show it
    assert _read(good).shape == (8, 8, 8)  # and the file itself is still read
    assert content_digest(good["image"])  # hashing a non-UTF-8 name works too
    assert "symlink loop" in by_rel["loop1.nii.gz"]["error"]
    (root / "m.csv").write_text("image\nloop1.nii.gz\n" + "scan_x.nii.gz\n")
    rows = discover_cases(root / "m.csv")
    assert "symlink loop" in rows[0]["error"] and "not found" in rows[1]["error"]


def test_fifo_and_device_are_not_cases_that_block(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    _nifti(root / "ok.nii.gz")
    os.mkfifo(root / "fifo.nii.gz")
    os.mkfifo(root / "fifo_no_name")
    os.symlink("/dev/zero", root / "zero.nii.gz")
    found = discover(root)  # returns: nothing opened the FIFO
    errors = {c["rel"]: c["error"] for c in found.cases}
    assert errors["ok.nii.gz"] is None
    assert "FIFO" in errors["fifo.nii.gz"]
    assert "escapes the input root" in errors["zero.nii.gz"]
    assert any(s["rel"] == "fifo_no_name" and "FIFO" in s["reason"] for s in found.skipped)
    (root / "m.csv").write_text("image\nfifo.nii.gz\n")
    assert "FIFO" in discover_cases(root / "m.csv")[0]["error"]


def test_duplicates_by_identity_and_content(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    _nifti(root / "a.nii.gz", seed=0)
    _nifti(root / "b.nii.gz", seed=1)
    shutil.copy(root / "a.nii.gz", root / "a_copy.nii.gz")
    os.symlink(root / "b.nii.gz", root / "b_link.nii.gz")
    found = discover(root)
    assert [c["rel"] for c in found.cases] == ["a.nii.gz", "b.nii.gz"]
    assert [c["index"] for c in found.cases] == [0, 1]
    dups = {d["rel"]: d for d in found.duplicates}
    assert dups["a_copy.nii.gz"]["duplicate_of"] == 0 and "copy" in dups["a_copy.nii.gz"]["reason"]
    assert dups["b_link.nii.gz"]["duplicate_of"] == 1 and "same file" in dups["b_link.nii.gz"]["reason"]
    # The same path relative and absolute in one manifest; a different label keeps both rows.
    (root / "m.csv").write_text(f"image,label\na.nii.gz,\n{root / 'a.nii.gz'},\nb.nii.gz,\nb.nii.gz,a.nii.gz\n")
    rows = discover(root / "m.csv")
    assert len(rows.cases) == 3 and [d["duplicate_of"] for d in rows.duplicates] == [0]
    # Same size, different bytes: not a duplicate (the fingerprint / digest tell them apart).
    same = tmp_path / "same"
    same.mkdir()
    _nifti(same / "x.nii", seed=3)
    _nifti(same / "y.nii", seed=4)
    assert os.path.getsize(same / "x.nii") == os.path.getsize(same / "y.nii")
    assert len(discover(same).cases) == 2
    # A copied DICOM series folder is one case too.
    write_series(tmp_path / "dcm" / "s1", n=4)
    shutil.copytree(tmp_path / "dcm" / "s1", tmp_path / "dcm" / "s2")
    series = discover(tmp_path / "dcm")
    assert len(series.cases) == 1 and series.duplicates[0]["rel"] == "s2"


def test_series_never_reads_a_slice_linked_from_outside(tmp_path):
    outside = write_series(tmp_path / "elsewhere", n=1, seed=5)  # another series, outside the input
    inner = tmp_path / "in" / "s"
    write_series(inner, n=4)
    os.symlink(outside[0], inner / "linked")
    found = discover(tmp_path / "in")
    assert len(found.cases) == 1 and "series_files" not in found.cases[0]
    assert [s["reason"] for s in found.skipped] == ["path escapes the input root (a symlink or ../ pointing elsewhere)"]
    assert _read(found.cases[0]).shape == (16, 16, 4)  # the reader leaves the link alone too
