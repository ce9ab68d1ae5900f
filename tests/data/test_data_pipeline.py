"""prepare -> volume shards -> crop streams on phantoms and real DICOM; resume after kill; de-identification."""

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

from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
from raymim.data.shards import read_volume, volume_index

CFG = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=3)


def _rows(out: Path) -> list[tuple]:
    """(case_id, shape, sha of image bytes) of every stored volume, sorted."""
    rows = []
    for f in sorted((out / "shards").glob("*.parquet")):
        t = pq.read_table(f, columns=["case_id", "shape", "image"])
        for cid, shape, img in zip(t["case_id"].to_pylist(), t["shape"].to_pylist(), t["image"].to_pylist(),
                                   strict=True):
            rows.append((cid, tuple(shape), hashlib.sha1(img).hexdigest()))
    return sorted(rows)


def _crops(rows: list[dict]) -> dict[tuple, str]:
    """{(case_id, pass, origin): sha of the crop} of crop-stream rows."""
    return {(r["case_id"], int(r["pass"]), tuple(int(v) for v in r["origin"])):
            hashlib.sha1(np.asarray(r["image"]).tobytes()).hexdigest() for r in rows}


@pytest.mark.slow
def test_prepare_volume_shards_rerun_and_streaming(ray_session, phantoms, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare
    from raymim.data.stream import crop_stream, stream_spec

    monkeypatch.setenv("RAYMIM_DEID_KEY", "test-key")
    out = tmp_path / "out"
    summary = prepare(phantoms, out, CFG, progress=False)
    assert summary["exit_code"] == 0 and summary["ok"] == 6 and summary["volumes"] == 6
    t = pq.read_table(next((out / "shards").glob("*.parquet")), columns=["domain", "report", "has_label",
                                                                          "orientation", "spacing"])
    assert set(t["domain"].to_pylist()) <= {"site0", "site1", "site2"}
    assert all(r and "mm" in r for r in t["report"].to_pylist()) and all(t["has_label"].to_pylist())
    assert all(o == "RAS" for o in t["orientation"].to_pylist())
    assert t["spacing"].to_pylist()[0] == pytest.approx([1.5, 1.5, 2.0])  # the default grid
    index = volume_index(out)
    assert len(index) == 6 and len({v["case_id"] for v in index}) == 6
    for v in index:
        vol = read_volume(v["file"], v["row_group"])
        assert vol["image"].dtype == np.float16 and list(vol["image"].shape) == v["shape"]
        assert vol["label"].shape == vol["image"].shape and min(v["shape"]) >= 16  # padded to the crop size
        image = vol["image"].astype(np.float32)
        lung = np.isin(vol["label"], [5, 6])  # lungs stay lung-like (-850 HU -> 0.075) after reorientation
        if lung.sum() > 50:
            assert image[lung].mean() < 0.2
        assert 0.0 <= image.min() and image.max() <= 1.0

    before = _rows(out)
    again = prepare(phantoms, out, CFG, progress=False)  # idempotent rerun
    assert again["skipped"] == 6 and again["volumes"] == 6 and _rows(out) == before

    cfg = RaymimConfig(prepare=CFG, train=TrainConfig(steps=2))
    from_shards = _crops(crop_stream(stream_spec(str(out), cfg), epoch=0).take_all())
    streamed = _crops(crop_stream(stream_spec(str(phantoms), cfg), epoch=0).take_all())
    assert len(from_shards) >= 6  # K = 3 per volume (two draws may coincide on a small volume)
    # raw scans go through the same preprocessing and the same sampler: the very same crops
    assert streamed == from_shards
    assert not list(phantoms.parent.rglob("*.parquet"))


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
    assert rows == _rows(ref) and len(rows) == len(set(rows)) == 12
    assert not list((out / "shards").glob(".tmp-*"))
