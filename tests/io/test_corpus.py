"""One `raymim prepare` over a corpus of more than 30 kinds of bad and odd inputs (generated here,
inside a folder named after a patient) beside good scans: it ends in bounded time with exit code 3,
every good case written, every bad one quarantined or skipped with its reason; the operator
report (outside the dataset) names each with its path; the dataset itself names no path and no
header value; resume works with the same key and is refused with another."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import stat
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from dicom_fixtures import BASIC_SR, RTSTRUCT, write_object, write_series
from test_reader_guards import _nhdr

from raymim.config import ConfigError, PrepareConfig
from raymim.io.dicom import SOP_SEG
from tests.data.data_fixtures import BROKEN, make_broken_corpus

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CFG = PrepareConfig(crop_size=[8, 8, 8], crops_per_volume=1, spacing=None)
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID-4711", "PatientBirthDate": "19700101"}
TIME_LIMIT_S = 420


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _tag(files: list[Path]) -> list[Path]:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in PATIENT.items():
            setattr(ds, k, v)
        ds.save_as(f)
    return files


def _patch(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(value)] = value
    path.write_bytes(bytes(raw))


def build_corpus(root: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(good case rels, {rel: (kind, expected reason substring)}) of a corpus under ``root``."""
    import nrrd

    p = root / "DOE_JANE_19700101"
    p.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = lambda seed=0: np.random.default_rng(seed).normal(0, 100, (12, 12, 12)).astype(np.float32)  # noqa: E731
    good, bad = [], {}
    pre = "DOE_JANE_19700101/"

    # -- good inputs -------------------------------------------------------------------------------
    _nifti(p / "good.nii.gz", vol(1))
    nrrd.write(str(p / "good.nrrd"), rng.integers(0, 1000, (12, 12, 12)).astype(np.int16),
               {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)})
    (p / "det").mkdir()
    (p / "det" / "x.raw").write_bytes(rng.integers(0, 1000, (8, 8, 8), dtype=np.int16).tobytes(order="F"))
    _nhdr(p / "det", "x.raw")
    _tag(write_series(p / "series", n=8, seed=1))
    study = p / "study"
    _tag(write_series(study, n=8, seed=2))
    _tag(write_series(study, n=6, seed=3, step=2.0))
    weird = os.fsdecode(b"scan_\xe9\xff.nii.gz")
    _nifti(p / weird, vol(2))
    good += [pre + n for n in ("good.nii.gz", "good.nrrd", "det/x.nhdr", "series")]
    good += [pre + "study (series 1 of 2)", pre + "study (series 2 of 2)", pre + "scan_\ufffd\ufffd.nii.gz"]

    # -- bad files, one per rejection rule (the data-plane corpus, reused) -----------------------
    make_broken_corpus(p / "broken", None)
    for name, why in BROKEN.items():
        if (p / "broken" / name).exists():
            bad[f"{pre}broken/{name}"] = ("rejected", why)
    bad[pre + "broken/manifest.csv"] = ("not an image", "not a DICOM file")

    # -- more bad NIfTI / NRRD ---------------------------------------------------------------------
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((2048, 2048, 256))
    raw = hdr.binaryblock + b"\x00" * 4 + bytes(1300)
    with gzip.open(p / "crafted.nii.gz", "wb") as f:
        f.write(raw)
    # refused from its header: by the size check, or first by the memory-aware scheduler
    bad[pre + "crafted.nii.gz"] = ("rejected", "far more data than the compressed file can hold|memory")
    for name, value in (("zero_pixdim.nii", 0.0), ("nan_pixdim.nii", np.nan)):
        _nifti(p / name, vol())
        _patch(p / name, 84, np.float32(value).tobytes())
        _patch(p / name, 252, np.zeros(2, np.int16).tobytes())
    bad[pre + "zero_pixdim.nii"] = ("rejected", "spacing is zero")
    bad[pre + "nan_pixdim.nii"] = ("rejected", "not a number")
    _nifti(p / "complex.nii.gz", (vol() + 1j).astype(np.complex64))
    bad[pre + "complex.nii.gz"] = ("rejected", "complex")
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rng.integers(0, 255, (8, 8, 8))
    _nifti(p / "rgb.nii.gz", rgb)
    bad[pre + "rgb.nii.gz"] = ("rejected", "RGB")
    aff = np.eye(4)
    aff[:3, 2] = [0.0, 1.0, 0.0]
    img = nib.Nifti1Image(vol(), aff)
    img.set_qform(None, code=0)
    nib.save(img, p / "singular.nii")
    bad[pre + "singular.nii"] = ("rejected", "not independent")
    for sub, target, why in (("esc", "../../secret.raw", "outside the header's folder"),
                             ("devzero", "/dev/zero", "outside the header's folder"),
                             ("missing", "gone.raw", "not found")):
        (p / sub).mkdir()
        _nhdr(p / sub, target)
        bad[f"{pre}{sub}/x.nhdr"] = ("rejected", why)
    (p / "secret.raw").write_bytes(bytes(1024))
    bad[pre + "secret.raw"] = ("not an image", "not a DICOM file")
    small = np.zeros((8, 8, 8), np.int16)
    nrrd.write(str(p / "ok.nrrd"), small, {"encoding": "gzip", "space": "left-posterior-superior",
                                           "space directions": np.eye(3), "space origin": np.zeros(3)})
    header = (p / "ok.nrrd").read_bytes().split(b"\n\n", 1)[0] + b"\n\n"
    (p / "ok.nrrd").unlink()
    (p / "bomb.nrrd").write_bytes(header + gzip.compress(bytes(32 << 20)))
    bad[pre + "bomb.nrrd"] = ("rejected", "longer than the header declares")
    nrrd.write(str(p / "nodirs.nrrd"), small + 1)
    bad[pre + "nodirs.nrrd"] = ("rejected", "orientation is unknown")

    # -- not regular files, links ------------------------------------------------------------------
    os.mkfifo(p / "fifo.nii.gz")
    bad[pre + "fifo.nii.gz"] = ("rejected", "FIFO")
    os.mkfifo(p / "fifo_no_suffix")
    bad[pre + "fifo_no_suffix"] = ("not an image", "FIFO")
    os.symlink("/dev/zero", p / "zero_link.nii.gz")
    bad[pre + "zero_link.nii.gz"] = ("rejected", "escapes the input root")
    os.symlink(p / "loop_b.nii.gz", p / "loop_a.nii.gz")
    os.symlink(p / "loop_a.nii.gz", p / "loop_b.nii.gz")
    bad[pre + "loop_a.nii.gz"] = ("rejected", "symlink loop")
    bad[pre + "loop_b.nii.gz"] = ("rejected", "symlink loop")
    shutil.copy(p / "good.nii.gz", p / "good_copy.nii.gz")
    bad[pre + "good_copy.nii.gz"] = ("duplicate", "byte-identical copy")
    os.symlink(p / "good.nrrd", p / "good_link.nrrd")
    bad[pre + "good_link.nrrd"] = ("duplicate", "the same file listed twice")
    _nifti(p / "liver_seg.nii.gz", vol(4))
    bad[pre + "liver_seg.nii.gz"] = ("not an image", "named like a label")

    # -- DICOM -------------------------------------------------------------------------------------
    _tag(write_series(p / "gap", z=[0, 3, 6, 12, 15]))
    bad[pre + "gap"] = ("rejected", "slice gap")
    _tag(write_series(p / "spacing", n=4, pixel_spacings=[0.8, 0.8, 0.9, 0.8]))
    bad[pre + "spacing"] = ("rejected", "pixel spacing differs")
    _tag(write_series(p / "dicom_rgb", n=4, rgb=True))
    bad[pre + "dicom_rgb"] = ("rejected", "RGB")
    trunc = _tag(write_series(p / "trunc", n=4, seed=6))
    trunc[1].write_bytes(trunc[1].read_bytes()[:100])
    bad[pre + "trunc"] = ("rejected", "unreadable DICOM slice")
    for sop, modality, prefix, why in ((RTSTRUCT, "RTSTRUCT", "RS.", "RT structure set"),
                                       (SOP_SEG, "SEG", "SEG.", "DICOM-SEG"),
                                       (BASIC_SR, "SR", "SR.", "structured report")):
        f = write_object(study, sop, modality, prefix)
        bad[f"{pre}study/{f.name}"] = ("not an image", why)
    (study / "README.txt").write_text("exported by the PACS for DOE^JANE\n")
    bad[pre + "study/README.txt"] = ("not an image", "not a DICOM file")

    # -- manifests and text that sit in the folder (files, not inputs, in a folder scan) ----------
    (p / "m.jsonl").write_text('["good.nii.gz"]\n')
    (p / "dataset.json").write_text(json.dumps([{"image": "good.nii.gz"}]))
    (p / "bom.csv").write_bytes("\ufeffimage,report\r\ngood.nii.gz,ok\r\n".encode())
    (p / "report.json").write_text(json.dumps({"image": "good.nii.gz", "report": 42}))
    for name in ("m.jsonl", "dataset.json", "bom.csv", "report.json"):
        bad[pre + name] = ("not an image", "not a DICOM file")
    return good, bad


def _bounded(fn, seconds: float):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"prepare did not finish within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _dataset_text(out: Path) -> str:
    """Everything the dataset folder holds that could carry text: JSON / CSV files as they are,
    and every Parquet file's metadata and non-volume columns (decoded, since they are compressed)."""
    parts = []
    for f in sorted(out.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".parquet":
            meta = pq.read_schema(f).metadata or {}
            parts += [k.decode("utf-8", "replace") + v.decode("utf-8", "replace") for k, v in meta.items()]
            table = pq.read_table(f)
            cols = [c for c in table.column_names if c not in ("image", "label", "lesion_prob")]
            parts.append(json.dumps(table.select(cols).to_pylist(), default=str))
        else:
            parts.append(f.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def test_one_prepare_over_the_corpus(ray_session, tmp_path):
    from raymim.data.pipeline import prepare
    from raymim.io.deid import FINGERPRINT_FILE, KEY_FILE_ENV

    good, bad = build_corpus(tmp_path / "in")
    assert len(bad) >= 30
    out = tmp_path / "out"
    summary = _bounded(lambda: prepare(tmp_path / "in", out, CFG, progress=False, max_rejected=1.0), TIME_LIMIT_S)
    n_rejected = sum(1 for kind, _ in bad.values() if kind == "rejected")
    n_skipped = len(bad) - n_rejected
    assert summary["exit_code"] == 3, summary
    assert summary["ok"] == len(good) and summary["rejected"] == n_rejected, summary
    assert summary["not_images"] + summary["duplicates"] == n_skipped, summary

    # The operator report: beside the dataset, every rejected / skipped file with path and reason.
    report = Path(summary["operator_report"])
    assert report == tmp_path / "out.operator-report.csv" and not report.is_relative_to(out)
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    rows = {r["input"]: r for r in csv.DictReader(report.open())}
    assert set(rows) == set(bad), (set(rows) ^ set(bad))
    for rel, (kind, why) in bad.items():
        row = rows[rel]
        assert row["kind"] == kind and re.search(why, row["reason"], re.IGNORECASE), (rel, row)
        assert os.path.isabs(row["path"]) and os.path.lexists(row["path"]), row
        assert "DOE_JANE_19700101" in row["path"]  # the operator finds it
        if kind == "rejected":
            assert row["case_id"] and len(row["case_id"]) == 20
    manifest = json.loads((out / "manifest.json").read_text())
    by_id = {c["case_id"]: c for c in manifest["cases"]}
    for row in rows.values():  # the report joins the dataset's records by case id
        if row["kind"] == "rejected":
            assert by_id[row["case_id"]]["reason"] == row["reason"]

    # The dataset names no path, no patient and no header value.
    text = _dataset_text(out)
    for secret in ("DOE", "JANE", "19700101", "PID-4711", str(tmp_path), "secret.raw", "fifo_no_suffix",
                   "scan_", "good_copy"):
        assert secret.lower() not in text.lower(), secret
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        [FINGERPRINT_FILE, "manifest.json", "quarantine.csv"])
    key_file = Path(os.environ[KEY_FILE_ENV])
    assert key_file.is_file() and not key_file.resolve().is_relative_to(out.resolve())
    assert key_file.read_text().strip() not in text

    # Resume with the same key: nothing redone; with another key: refused before any work.
    again = prepare(tmp_path / "in", out, CFG, progress=False, max_rejected=1.0)
    # (rejections caused by the machine, such as a memory estimate over the node's, are examined again)
    assert again["ok"] == again["volumes"] == len(good) and again["rejected"] == n_rejected, again
    assert again["skipped"] >= len(good) + n_rejected - 1, again
    other = tmp_path / "other.key"
    other.write_text("some-other-key\n")
    with pytest.raises(ConfigError, match="another de-identification key"):
        prepare(tmp_path / "in", out, CFG, progress=False, deid_key_file=other)
    with pytest.raises(ConfigError, match="inside the dataset"):
        prepare(tmp_path / "in", out, CFG, progress=False, report=out / "report.csv")
