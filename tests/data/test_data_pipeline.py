"""prepare -> shards -> read_shards on phantoms and real DICOM; resume after kill; de-identification."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raymim.config import PrepareConfig
from raymim.data.shards import read_shards

CFG = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=3)


def _rows(out: Path) -> list[tuple]:
    """(case_id, origin, sha of image bytes) of every shard row, sorted."""
    rows = []
    for f in sorted((out / "shards").glob("*.parquet")):
        t = pq.read_table(f, columns=["case_id", "origin", "image"])
        imgs = t["image"].combine_chunks().to_numpy_ndarray()
        for cid, origin, img in zip(t["case_id"].to_pylist(), t["origin"].to_pylist(), imgs, strict=True):
            rows.append((cid, tuple(origin), hashlib.sha1(img.tobytes()).hexdigest()))
    return sorted(rows)


@pytest.mark.slow
def test_prepare_read_shards_and_rerun(ray_session, phantoms, tmp_path, monkeypatch):
    from raymim.data.pipeline import crop_dataset, prepare

    monkeypatch.setenv("RAYMIM_DEID_KEY", "test-key")
    out = tmp_path / "out"
    summary = prepare(phantoms, out, CFG, progress=False)
    assert summary["exit_code"] == 0 and summary["ok"] == 6 and summary["crops"] == 18
    t = pq.read_table(next((out / "shards").glob("*.parquet")))
    assert t.schema.field("image").type.shape == [16, 16, 16]
    assert str(t.schema.field("image").type.value_type) == "halffloat"
    assert set(t["domain"].to_pylist()) <= {"site0", "site1", "site2"}
    assert all(r and "mm" in r for r in t["report"].to_pylist()) and all(t["has_label"].to_pylist())
    assert all(o == "RAS" for o in t["orientation"].to_pylist())
    labels = t["label"].combine_chunks().to_numpy_ndarray()
    images = t["image"].combine_chunks().to_numpy_ndarray().astype(np.float32)
    lung = np.isin(labels, [5, 6])  # lungs stay lung-like (-850 HU -> 0.075) after reorientation
    if lung.sum() > 50:
        assert images[lung].mean() < 0.2
    assert 0.0 <= images.min() and images.max() <= 1.0

    ds = read_shards(out, columns=["image", "foreground"])  # string columns do not collate to tensors
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 16, 16, 16) and batch["image"].is_floating_point()
    assert ds.count() == 18

    before = _rows(out)
    again = prepare(phantoms, out, CFG, progress=False)  # idempotent rerun
    assert again["skipped"] == 6 and again["crops"] == 18 and _rows(out) == before

    streamed = crop_dataset(phantoms, CFG).take_all()
    ids = sorted((r["case_id"], tuple(int(v) for v in r["origin"])) for r in streamed)
    assert ids == sorted((r[0], r[1]) for r in before)


IDENTIFIER_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                   "ReferringPhysicianName", "StudyID")


@pytest.mark.slow
def test_no_dicom_identifier_in_outputs(ray_session, shared_data, tmp_path):
    import pydicom

    from raymim.data.pipeline import prepare

    series = shared_data / "totalsegmentator" / "example_ct_dicom"
    src = tmp_path / "JOHN_DOE_12345" / "series1"
    src.mkdir(parents=True)
    secrets = {"JOHN_DOE_12345", str(src)}
    for i, f in enumerate(sorted(series.iterdir())):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Johnathan", "PID-998877", "19450312"
        ds.AccessionNumber, ds.InstitutionName = "ACC-55443322", "Saint Example Hospital"
        ds.save_as(src / f"slice{i:03d}.dcm")
    for tag in IDENTIFIER_TAGS:
        value = str(getattr(pydicom.dcmread(src / "slice000.dcm"), tag, "") or "")
        if len(value) >= 4:
            secrets.add(value)
    cfg = PrepareConfig(crop_size=[32, 32, 16], crops_per_volume=2, spacing=[4.0, 4.0, 2.0])
    out = tmp_path / "out"
    summary = prepare(tmp_path / "JOHN_DOE_12345", out, cfg, progress=False)
    assert summary["ok"] == 1, summary
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".raymim_secret"]
    assert len(blobs) >= 3
    for blob in blobs:
        for s in secrets:
            assert s.encode() not in blob, s


RESUME_SCRIPT = """
import sys
from raymim.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_kill(ray_session, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare
    from raymim.data.synth import generate_phantoms

    manifest = generate_phantoms(tmp_path / "ph", cases=12, size=24, seed=3)
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               RAYMIM_DEID_KEY="resume-key")
    args = ["prepare", "--input", str(manifest), "--no-progress", "--set", "prepare.crop_size=[16,16,16]",
            "--set", "prepare.shard_mb=1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    cmd = [sys.executable, "-c", RESUME_SCRIPT, *args]
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "shards").glob("part-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # killed mid-run (after the first commit at the latest)
    proc.wait()
    assert not any(p.name.startswith("part-") and p.suffix != ".parquet" for p in (out / "shards").iterdir())
    assert subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True).returncode == 0
    monkeypatch.setenv("RAYMIM_DEID_KEY", "resume-key")  # reference: one uninterrupted run
    prepare(manifest, ref, PrepareConfig(crop_size=[16, 16, 16], shard_mb=1), progress=False)
    rows = _rows(out)
    assert rows == _rows(ref) and len(rows) == len(set(rows)) == 12 * 4
    assert not list((out / "shards").glob(".tmp-*"))
