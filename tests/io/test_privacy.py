"""Privacy of `raymim prepare`'s outputs, case by case (no Ray): the de-identification key stays
outside the dataset and a resume with another key is refused; quarantine reasons of bad files in
a patient-named folder carry no path fragment and no header value; a case's report loses the
identifiers of its own DICOM header."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_fixtures import write_series

from raymim.config import PrepareConfig
from raymim.data.worker import process_case
from raymim.io.deid import (
    FINGERPRINT_FILE,
    KEY_ENV,
    KEY_FILE_ENV,
    SECRET_NAME,
    DeidKeyError,
    dataset_key,
    find_dataset_key,
    key_fingerprint,
    scrub_report,
)
from raymim.io.discover import discover_cases

CFG = PrepareConfig(crop_size=[8, 8, 8], crops_per_volume=1, spacing=None)
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID-4711", "PatientBirthDate": "19700101",
           "StudyDate": "20221208", "AccessionNumber": "ACC-55443322", "ReferringPhysicianName": "HOUSE^GREGORY",
           "InstitutionName": "Saint Example Hospital"}


def _ctx(cfg: PrepareConfig = CFG) -> dict:
    return {"cfg": dataclasses.asdict(cfg), "key": "00" * 16, "config_hash": "t", "keep_paths": False}


@pytest.fixture
def key_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv(KEY_ENV, raising=False)
    path = tmp_path / "home" / ".config" / "raymim" / "deid.key"
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    return path


# -- the key ---------------------------------------------------------------------------------------


def test_key_lives_outside_the_dataset_which_records_only_its_fingerprint(tmp_path, key_file):
    out = tmp_path / "ds"
    key = dataset_key(out)
    assert key_file.is_file() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key == key_file.read_text().strip().encode() and len(key) == 64
    assert not key_file.resolve().is_relative_to(out.resolve())
    recorded = json.loads((out / FINGERPRINT_FILE).read_text())
    assert recorded["key_fingerprint"] == key_fingerprint(key)
    assert [p.name for p in out.iterdir()] == [FINGERPRINT_FILE]
    assert all(key not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    # Resume: the same key is accepted (and found again for the overlap check).
    assert dataset_key(out) == key and find_dataset_key(out) == key
    # Another key (a file passed explicitly, or the environment) is refused, clearly.
    other = tmp_path / "other.key"
    other.write_text("another-secret\n")
    with pytest.raises(DeidKeyError, match="another de-identification key") as info:
        dataset_key(out, other)
    assert key_fingerprint(key) in str(info.value) and "another-secret" not in str(info.value)
    os.environ[KEY_ENV] = "env-secret"
    try:
        with pytest.raises(DeidKeyError, match="another de-identification key"):
            dataset_key(out)
    finally:
        del os.environ[KEY_ENV]
    # --overwrite starts over with the new key.
    assert dataset_key(out, other, overwrite=True) == b"another-secret"
    assert find_dataset_key(out) is None  # neither the env nor the per-user key matches now


def test_key_file_inside_the_output_folder_is_refused(tmp_path, key_file):
    out = tmp_path / "ds"
    with pytest.raises(DeidKeyError, match="inside the output folder"):
        dataset_key(out, out / "secrets" / "deid.key")
    assert not (out / "secrets" / "deid.key").exists()  # refused before anything was created


def test_legacy_in_dataset_key_is_refused_with_the_command_that_moves_it(tmp_path, key_file):
    out = tmp_path / "old"
    out.mkdir()
    (out / SECRET_NAME).write_text("legacy-key\n")
    with pytest.raises(DeidKeyError, match="inside the dataset") as info:
        dataset_key(out)
    assert "mv " in str(info.value) and "--deid-key" in str(info.value)
    moved = tmp_path / "legacy.key"
    shutil.move(out / SECRET_NAME, moved)  # what the message says: the ids stay the same
    assert dataset_key(out, moved) == b"legacy-key"
    (out / SECRET_NAME).write_text("legacy-key\n")
    dataset_key(out, moved, overwrite=True)  # or start over: the in-dataset copy is deleted
    assert not (out / SECRET_NAME).exists()


# -- quarantine reasons ----------------------------------------------------------------------------


def _set(files: list[Path], **tags) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(f)


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    nib.save(img, path)
    return path


def _bad_corpus(root: Path) -> Path:
    """Bad inputs in a folder named after a patient, each file named after her too."""
    folder = root / "DOE_JANE_19700101"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = rng.normal(0, 100, (12, 12, 12)).astype(np.float32)
    (folder / "DOE_JANE_zero.nii.gz").write_bytes(b"")
    raw = _nifti(folder / "DOE_JANE_full.nii", good).read_bytes()
    (folder / "DOE_JANE_full.nii").write_bytes(raw[: len(raw) // 2])
    _nifti(folder / "DOE_JANE_nan.nii.gz", np.full((12, 12, 12), np.nan, np.float32))
    sub = folder / "DOE_JANE_nrrd"
    sub.mkdir()
    head = ("NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\n")
    (sub / "DOE_JANE_escape.nhdr").write_text(head + "encoding: raw\ndata file: ../../DOE_JANE_pixels.raw\n")
    (sub / "DOE_JANE_missing.nhdr").write_text(head + "encoding: raw\ndata file: sub/DOE_JANE_pixels.raw\n")
    # Text data that pynrrd cannot parse: an unexpected ValueError, not a CaseRejected.
    (sub / "DOE_JANE_text.nhdr").write_text(head + "encoding: ascii\ndata file: DOE_JANE_pixels.txt\n")
    (sub / "DOE_JANE_pixels.txt").write_text(" ".join(["DOE_JANE_19700101"] * 70))
    os.mkfifo(folder / "DOE_JANE_fifo.nii.gz")
    for name, kw in (("gap", {"z": [0, 3, 6, 12, 15]}), ("rgb", {"rgb": True}),
                     ("spacing", {"n": 4, "pixel_spacings": [0.8, 0.8, 0.9, 0.8]})):
        files = write_series(folder / f"DOE_JANE_{name}", n=5, **kw) if "n" not in kw else \
            write_series(folder / f"DOE_JANE_{name}", **kw)
        _set(files, **PATIENT)
    trunc = write_series(folder / "DOE_JANE_truncated", n=4)
    _set(trunc, **PATIENT)
    trunc[1].write_bytes(trunc[1].read_bytes()[:300])
    return folder


def _secrets(root: Path) -> set[str]:
    names = {p.name for p in root.rglob("*")} | {str(root)}
    return names | {"DOE", "JANE", "19700101", "PID-4711", "4711", "GREGORY", "HOUSE", "ACC-55443322",
                    "Saint Example", "DOE_JANE_pixels"}


def test_reasons_carry_no_path_fragment_and_no_header_value(tmp_path):
    folder = _bad_corpus(tmp_path / "in")
    cases = discover_cases(tmp_path / "in")
    assert len(cases) >= 9
    secrets = _secrets(tmp_path / "in")
    reasons = {}
    for case in cases:
        status, row = process_case(case, _ctx())
        assert status["status"] == "rejected" and row is None, (case["rel"], status)
        reason = status["reason"]
        reasons[case["rel"].split("/")[-1]] = reason
        assert reason and "\n" not in reason and "/" + "tmp" not in reason
        for s in secrets:
            assert s.lower() not in reason.lower(), (case["rel"], reason, s)
    assert "outside the header's folder" in reasons["DOE_JANE_escape.nhdr"]
    assert "not found" in reasons["DOE_JANE_missing.nhdr"]
    assert reasons["DOE_JANE_text.nhdr"].startswith("unexpected ValueError")
    assert "slice gap" in reasons["DOE_JANE_gap"] and "RGB" in reasons["DOE_JANE_rgb"]
    assert "pixel spacing differs" in reasons["DOE_JANE_spacing"] and "FIFO" in reasons["DOE_JANE_fifo.nii.gz"]
    assert folder.name not in json.dumps(reasons)


# -- reports ---------------------------------------------------------------------------------------

REPORT = ("Patient: Jane Doe (DOE^JANE), ID PID-4711, accession ACC-55443322, born 01.01.1970. "
          "CT abdomen of 8 December 2022 (2022-12-08), referred by Dr. Gregory House, Saint Example Hospital. "
          "Findings: 12 mm hypodense lesion in the left liver lobe. Impression: likely cyst.")
LEAKS = ("jane", "doe", "4711", "55443322", "1970", "2022", "december", "gregory", "house", "saint example")


def _report_case(tmp_path: Path, series: Path) -> dict:
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(series), "report": REPORT, "patient": "MRN-0099"})
                                      + "\n")
    (case,) = discover_cases(tmp_path / "m.jsonl")
    return case


def _check_report(text: str) -> None:
    assert "12 mm hypodense lesion in the left liver lobe" in text and "likely cyst" in text
    for leak in LEAKS:
        assert leak not in text.lower(), (leak, text)
    assert "[name]" in text and "[id]" in text and "[date]" in text


def test_dicom_report_loses_its_header_identifiers(tmp_path):
    series = tmp_path / "series"
    _set(write_series(series, n=6), **PATIENT)
    status, row = process_case(_report_case(tmp_path, series), _ctx())
    assert status["status"] == "ok", status
    _check_report(row["report"])


def test_real_dicom_series_report_loses_its_header_identifiers(shared_data, tmp_path):
    src = shared_data / "totalsegmentator" / "example_ct_dicom"
    series = tmp_path / "DOE_JANE_19700101"
    series.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copy(f, series / f.name)
    _set(sorted(series.iterdir()), **PATIENT)
    cfg = PrepareConfig(crop_size=[32, 32, 16], crops_per_volume=1, spacing=[4.0, 4.0, 2.0])
    status, row = process_case(_report_case(tmp_path, series), _ctx(cfg))
    assert status["status"] == "ok", status
    _check_report(row["report"])


def test_scrub_report_rules():
    ids = {"names": {"DOE^JANE^MARIE^DR^"}, "ids": {"PID-4711", "7"}, "dates": {"19700102"}, "other": set()}
    text = ("DOE, Jane Marie seen by Dr. Who; pid 4711 / PID4711; 2 Jan 1970, January 2nd, 1970, 1970/01/02, "
            "02.01.70; 7 mm nodule; Doeberl unchanged.")
    out = scrub_report(text, ids)
    assert "Jane" not in out and "DOE" not in out and "Marie" not in out and "4711" not in out and "1970" not in out
    assert "Dr. Who" in out  # a title is not a name
    assert "7 mm nodule" in out  # IDs shorter than 3 characters would erase ordinary text
    assert "Doeberl" in out  # whole words only
    assert out.count("[date]") == 4
    assert scrub_report(None, ids) is None and scrub_report("", ids) == ""


def test_an_unexpected_error_quoting_a_path_keeps_it_out_of_the_reason(tmp_path):
    from raymim.data.worker import _detail, _reason

    missing = tmp_path / "DOE_JANE_19700101" / "pixels.raw"
    try:
        try:
            open(missing, "rb")
        except OSError as exc:  # what a library wrapping a failed open raises
            raise RuntimeError(f"cannot load {missing.parent}: {exc}") from exc
    except RuntimeError as exc:
        reason, detail = _reason(exc), _detail(exc)
    assert reason == "unexpected FileNotFoundError while reading or preprocessing the image"
    assert str(missing) in detail  # the operator report gets the message, the dataset never does


def test_cli_refuses_another_key_and_a_report_inside_the_dataset(tmp_path, key_file, capsys):
    """`raymim prepare --deid-key` / `--report`: one-line errors (exit 2) before Ray starts."""
    from raymim.cli import main

    _nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32))
    out = tmp_path / "ds"
    dataset_key(out)  # prepared earlier with the per-user key
    assert "created the de-identification key" in capsys.readouterr().err
    other = tmp_path / "other.key"
    other.write_text("another\n")
    base = ["prepare", "--input", str(tmp_path / "ct.nii.gz"), "--out", str(out), "--no-progress"]
    for extra, needle in ((["--deid-key", str(other)], "another de-identification key"),
                          (["--deid-key", str(out / "k.key")], "inside the output folder"),
                          (["--report", str(out / "r.csv")], "inside the dataset")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == [FINGERPRINT_FILE]


def test_resume_naming_a_missing_key_file_creates_no_new_key(tmp_path, key_file):
    out = tmp_path / "ds"
    key = dataset_key(out)
    typo = tmp_path / "typo.key"
    with pytest.raises(DeidKeyError, match="no de-identification key file") as info:
        dataset_key(out, typo)
    assert key_fingerprint(key) in str(info.value) and not typo.exists()
