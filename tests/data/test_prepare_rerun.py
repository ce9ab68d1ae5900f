"""Reruns of ``raymim prepare`` on a changed input: a changed file replaces its old volume, the
operator report describes the current state, and a case that runs too long is timed out."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from raymim.config import PrepareConfig
from raymim.data.shards import case_ids, read_volume, volume_index

CFG = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2)


def _by_source(out: Path) -> dict[str, tuple[str, str]]:
    """{source path: (case_id, sha1 of the stored image)} of every stored volume (``--keep-paths``)."""
    rows = {}
    for v in volume_index(out):
        vol = read_volume(v["file"], v["row_group"], ["source"])
        assert vol["source"] not in rows, "one input stored twice"
        rows[vol["source"]] = (v["case_id"], hashlib.sha1(vol["image"].tobytes()).hexdigest())
    return rows


def _phantoms(root: Path, n: int) -> Path:
    from raymim.data.synth import generate_phantoms

    generate_phantoms(root, cases=n, size=24, seed=3)
    manifest = root / "m.csv"
    manifest.write_text("image\n" + "".join(f"images/case_{i:05d}.nii.gz\n" for i in range(n)))
    return manifest


def test_changed_input_replaces_its_old_volume(ray_session, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare
    from raymim.data.worker import preprocess_case

    monkeypatch.setenv("RAYMIM_DEID_KEY", "rerun-key")
    manifest = _phantoms(tmp_path / "in", 4)
    out = tmp_path / "out"
    first = prepare(manifest, out, CFG, progress=False, keep_paths=True)
    assert first["ok"] == 4 and first["replaced"] == 0
    before = _by_source(out)
    shards_before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    changed = "images/case_00001.nii.gz"
    holding = {n for n in shards_before if before[changed][0] in
               pq.read_table(out / "shards" / n, columns=["case_id"]).column("case_id").to_pylist()}
    assert len(holding) == 1

    target = tmp_path / "in" / "images" / "case_00001.nii.gz"
    original = target.read_bytes()
    img = nib.load(target)
    data = np.asarray(img.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(np.flip(data, 0) * 0.8 + 20, img.affine, img.header), target)  # new voxels

    second = prepare(manifest, out, CFG, progress=False, keep_paths=True)
    assert second["ok"] == 4 and second["volumes"] == 4 and second["replaced"] == 1, second
    assert second["skipped"] == 3  # the other three are not prepared again
    after = _by_source(out)
    assert set(after) == set(before) and len(case_ids(out)) == 4
    assert after[changed][0] != before[changed][0] and after[changed][1] != before[changed][1]
    assert {k: v for k, v in after.items() if k != changed} == {k: v for k, v in before.items() if k != changed}
    # the stored volume is the new file's, voxel for voxel
    expect = preprocess_case({"image": str(target), "label": str(tmp_path / "in" / "labels" /
                                                                  "case_00001.nii.gz")}, CFG, "check")
    (v,) = [v for v in volume_index(out) if v["case_id"] == after[changed][0]]
    stored = read_volume(v["file"], v["row_group"])["image"]
    assert stored.shape == expect["image"].shape
    assert np.array_equal(stored, expect["image"].astype(np.float16))
    manifest_json = json.loads((out / "manifest.json").read_text())
    ids = [c["case_id"] for c in manifest_json["cases"]]
    assert len(ids) == 4 and before[changed][0] not in ids and after[changed][0] in ids
    # shards that did not hold the old volume are not touched
    for name in set(shards_before) - holding:
        assert (out / "shards" / name).stat().st_mtime_ns == shards_before[name]
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]

    third = prepare(manifest, out, CFG, progress=False, keep_paths=True)  # nothing changed
    assert third["skipped"] == 4 and third["replaced"] == 0 and _by_source(out) == after

    target.write_bytes(original)  # back to the first content: its volume comes back, once
    fourth = prepare(manifest, out, CFG, progress=False, keep_paths=True)
    assert fourth["replaced"] == 1 and fourth["skipped"] == 3 and fourth["volumes"] == 4
    assert _by_source(out) == before


def test_operator_report_describes_the_current_state(ray_session, tmp_path, monkeypatch):
    from raymim.data.pipeline import prepare

    monkeypatch.setenv("RAYMIM_DEID_KEY", "report-key")
    manifest = _phantoms(tmp_path / "in", 4)
    images = tmp_path / "in" / "images"
    whole = {i: (images / f"case_{i:05d}.nii.gz").read_bytes() for i in (2, 3)}
    for i in (2, 3):
        (images / f"case_{i:05d}.nii.gz").write_bytes(whole[i][: len(whole[i]) // 2])  # truncated
    out, report = tmp_path / "out", tmp_path / "report.csv"

    def rejected_rows() -> list[dict]:
        return [r for r in csv.DictReader(open(report)) if r["kind"] == "rejected"]

    first = prepare(manifest, out, CFG, progress=False, max_rejected=1.0, report=report)
    assert first["rejected"] == 2
    assert sorted(Path(r["path"]).name for r in rejected_rows()) == ["case_00002.nii.gz", "case_00003.nii.gz"]

    (images / "case_00002.nii.gz").write_bytes(whole[2])  # fixed
    manifest.write_text("image\n" + "".join(f"images/case_{i:05d}.nii.gz\n" for i in range(3)))  # 3: removed
    second = prepare(manifest, out, CFG, progress=False, report=report)
    assert second["rejected"] == 0 and second["ok"] == 3 and second["exit_code"] == 0, second
    assert rejected_rows() == []  # neither the fixed nor the removed input's old rejection
    assert list(csv.DictReader(open(out / "quarantine.csv"))) == []

    (images / "case_00001.nii.gz").write_bytes(b"\x00" * 10)  # a new rejection is listed, with its path
    third = prepare(manifest, out, CFG, progress=False, report=report)
    rows = rejected_rows()
    assert third["rejected"] == 1 and [Path(r["path"]).name for r in rows] == ["case_00001.nii.gz"]
    assert rows[0]["case_id"] == next(csv.DictReader(open(out / "quarantine.csv")))["case_id"]


def _nifti(path: Path, shape: tuple[int, int, int], zoom: float, seed: int) -> None:
    data = np.random.default_rng(seed).normal(0, 200, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), path)


@pytest.fixture
def slow_corpus(tmp_path):
    """Two tiny volumes and one that is legitimately slow to prepare at the test's spacing (52^3 at
    4 mm resampled to 0.6 mm: 347^3 voxels, several seconds on one CPU; about 2 GB of memory)."""
    root = tmp_path / "slow"
    root.mkdir()
    for seed, (name, shape) in enumerate((("a_tiny.nii.gz", (6, 6, 6)), ("b_slow.nii.gz", (52, 52, 52)),
                                          ("c_tiny.nii.gz", (6, 6, 6)))):
        _nifti(root / name, shape, 4.0, seed)
    return root


# MR scaling: a percentile over every resampled voxel adds CPU time but no memory
SLOW_CFG = PrepareConfig(crop_size=[16, 16, 16], spacing=[0.6, 0.6, 0.6], min_foreground=0.0, modality="mr",
                         case_timeout_s=0.0)


@pytest.mark.slow  # one case is slow on purpose, prepared once in full
def test_case_over_the_timeout_is_quarantined_and_the_job_goes_on(ray_session, slow_corpus, tmp_path, monkeypatch):
    """No real decoder hang can be made portably from a regular file (FIFOs and devices are refused
    before they are opened), so this runs the mechanism against a real case that is slow to
    resample: first without a limit (it is prepared: slow, not broken; that takes ``T``), then with
    ``prepare.case_timeout_s`` a quarter of ``T`` (so the test holds on a fast or a loaded machine):
    its worker is killed mid-case, it is quarantined, and the quick cases are prepared."""
    import dataclasses

    from raymim.data import pipeline
    from raymim.io.deid import deid_key
    from raymim.io.discover import discover_cases

    monkeypatch.setenv("RAYMIM_DEID_KEY", "timeout-key")
    cases = discover_cases(slow_corpus)
    assert [c["rel"] for c in cases] == ["a_tiny.nii.gz", "b_slow.nii.gz", "c_tiny.nii.gz"]
    ctx = pipeline._context(SLOW_CFG, deid_key(None), tmp_path / "warm", False, set())
    pipeline._run_batches([([cases[0]], None)], ctx, tmp_path / "warm", progress=False)  # workers warm
    # A task's own cost (submit, start, libraries, commit), measured on a quick case, is not part
    # of the time the driver clocks for a case inside a batch, so it is taken off the slow case's.
    t0 = time.monotonic()
    ctx = pipeline._context(SLOW_CFG, deid_key(None), tmp_path / "quick", False, set())
    pipeline._run_batches([([cases[2]], None)], ctx, tmp_path / "quick", progress=False)
    overhead = time.monotonic() - t0
    # finer target spacings until the slow case itself takes long enough on this machine
    # (resampling is fast since the separable resampler; a fast machine needs a finer grid)
    for step, spacing in enumerate((0.6, 0.45, 0.36, 0.3, 0.25)):
        base = dataclasses.replace(SLOW_CFG, spacing=[spacing] * 3)
        t0 = time.monotonic()
        ctx = pipeline._context(base, deid_key(None), tmp_path / f"off{step}", False, set())
        (done,) = pipeline._run_batches([([cases[1]], None)], ctx, tmp_path / f"off{step}", progress=False)
        slow = time.monotonic() - t0 - overhead
        assert done["status"] == "ok"
        if slow > 5.0:
            break
    assert slow > 5.0, f"the slow case took only {slow:.1f} s at {spacing} mm: make it slower for this machine"
    # The driver sees a case start at its next poll (up to 1 s late) and kills it at the first poll
    # past the limit (up to 1 s more): the kill comes within limit + 2 s, well below ``slow``.
    limit = round(max(0.5, slow / 4), 1)
    cfg = dataclasses.replace(base, case_timeout_s=limit)
    reason = f"timed out after {limit:g} s"

    out = tmp_path / "out"
    summary = pipeline.prepare(slow_corpus, out, cfg, progress=False, max_rejected=1.0)
    assert summary["ok"] == 2 and summary["rejected"] == 1 and summary["exit_code"] == 3, (summary, slow)
    (row,) = list(csv.DictReader(open(out / "quarantine.csv")))
    assert row["reason"].startswith(reason)
    assert not (out / pipeline.PROGRESS_DIR).exists()
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # the killed task's temp shard

    # The slow case inside one batch with two quick ones: it is timed out alone, and the batch's
    # other cases (one before it, uncommitted when its worker was killed) run again.
    out2 = tmp_path / "out2"
    ctx = pipeline._context(cfg, deid_key(None), out2, False, set())
    statuses = pipeline._run_batches([(cases, None)], ctx, out2, progress=False)
    by_index = {s["index"]: s for s in statuses}
    assert sorted(by_index) == [0, 1, 2] and len(statuses) == 3
    assert by_index[0]["status"] == by_index[2]["status"] == "ok", statuses
    assert by_index[1]["status"] == "rejected" and by_index[1]["reason"].startswith(reason)
    assert by_index[1].get("retry") is True  # a rerun examines it again (perhaps on a less loaded node)
    assert len(volume_index(out2)) == 2
