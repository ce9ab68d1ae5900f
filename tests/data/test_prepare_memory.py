"""Memory of `raymim prepare`: each case's need estimated from its header, asked of Ray as the
task's ``memory=``, and a case that fits on no node rejected with a reason before it is read.
The large volumes here are sparse files: valid headers, no bytes on disk, nothing allocated."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raymim.config import PrepareConfig
from raymim.data.memory import WORKER_BYTES, estimate_bytes, request_bytes

CFG = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2)


def sparse_nifti(path: Path, shape: tuple[int, int, int], zooms: tuple[float, float, float],
                 dtype=np.int16) -> Path:
    """An uncompressed NIfTI whose header declares ``shape`` and whose file holds every voxel
    byte as a hole (reads as zeros; takes no disk space)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_zooms(zooms)
    hdr.set_qform(np.diag([*zooms, 1.0]), code=1)
    hdr.set_sform(np.diag([*zooms, 1.0]), code=1)
    offset = 352
    hdr["vox_offset"] = offset
    with open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\x00" * (offset - len(hdr.binaryblock)))
        f.truncate(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return path


def test_estimate_from_header_matches_the_measured_large_volume(tmp_path):
    # The volume of the issue: 1024 x 1024 x 600 int16 used 13 GB in one worker.
    big = sparse_nifti(tmp_path / "big.nii", (1024, 1024, 600), (0.49, 0.49, 0.625))
    est = estimate_bytes({"image": str(big)}, PrepareConfig())
    assert 11e9 < est < 16e9, est / 1e9
    small = sparse_nifti(tmp_path / "small.nii", (64, 64, 40), (1.5, 1.5, 2.0))
    assert WORKER_BYTES < estimate_bytes({"image": str(small)}, PrepareConfig()) < WORKER_BYTES + (64 << 20)
    # resampling to a finer grid costs per output voxel: 8x the voxels, much more memory
    fine = estimate_bytes({"image": str(small)}, PrepareConfig(spacing=[0.75, 0.75, 1.0]))
    assert fine > estimate_bytes({"image": str(small)}, PrepareConfig()) + 64 * 64 * 40 * 7 * 60
    # a header the readers refuse gets no estimate: the worker rejects it with their reason
    huge = sparse_nifti(tmp_path / "huge.nii", (4000, 4000, 4000), (1.0, 1.0, 1.0))
    assert estimate_bytes({"image": str(huge)}, PrepareConfig()) is None
    assert estimate_bytes({"image": str(tmp_path / "missing.nii.gz")}, PrepareConfig()) is None


def test_batches_ask_for_their_largest_case():
    from raymim.data.pipeline import plan_batches

    gb = 1 << 30
    cases = [{"index": i} for i in range(7)]
    est = [gb, 3 * gb, None, int(0.9 * gb), 20 * gb, gb, int(2.9 * gb)]
    batches, too_large = plan_batches(cases, est, per_task=2, limit=8 * gb, node=16 * gb)
    assert [(c["index"], e) for c, e in too_large] == [(4, 20 * gb)]
    assert sorted(c["index"] for b, _ in batches for c in b) == [0, 1, 2, 3, 5, 6]
    for members, mem in batches:
        needs = [request_bytes(est[c["index"]]) for c in members]
        assert mem == max(needs) and all(n >= mem // 2 for n in needs)  # no small case holds a big request
    assert batches[0][1] == request_bytes(3 * gb)  # largest first
    # no memory resource reported by Ray: nothing is asked for (a request would never be granted)
    assert all(mem is None for _, mem in plan_batches(cases, est, 2, 8 * gb, node=0)[0])


def _quarantine(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "quarantine.csv")))


@pytest.mark.slow
def test_case_over_the_memory_limit_is_rejected_and_tasks_ask_for_memory(ray_session, tmp_path, monkeypatch):
    from ray.util.state import list_tasks

    from raymim.data.pipeline import TASK_NAME, prepare
    from raymim.data.synth import generate_phantoms

    monkeypatch.setenv("RAYMIM_DEID_KEY", "k")
    root = tmp_path / "in"
    generate_phantoms(root, cases=3, size=24, seed=5)
    sparse_nifti(root / "big.nii", (1024, 1024, 600), (0.49, 0.49, 0.625))
    manifest = root / "m.csv"
    manifest.write_text("image\n" + "".join(f"images/case_{i:05d}.nii.gz\n" for i in range(3)) + "big.nii\n")
    cfg = PrepareConfig(crop_size=[16, 16, 16], max_case_memory_gb=4.0)
    t0 = time.time()
    summary = prepare(manifest, tmp_path / "out", cfg, progress=False, max_rejected=1.0)
    assert summary["exit_code"] == 3 and summary["ok"] == 3 and summary["rejected"] == 1, summary
    (row,) = _quarantine(tmp_path / "out")
    assert "GiB of memory" in row["reason"] and "prepare.max_case_memory_gb" in row["reason"], row
    assert str(root) not in row["reason"]
    # memory= reached the tasks: every prepare task asked Ray for at least a worker's memory
    deadline, tasks = time.time() + 30, []
    while time.time() < deadline:
        tasks = [t for t in list_tasks(address=ray_session.get_runtime_context().gcs_address,
                                       filters=[("name", "=", TASK_NAME)], detail=True, limit=10000)
                 if t.creation_time_ms and t.creation_time_ms >= t0 * 1000 - 1000]
        if tasks:
            break
        time.sleep(1)
    assert tasks and all(t.required_resources.get("memory", 0) >= WORKER_BYTES for t in tasks), \
        [t.required_resources for t in tasks]
    # the rejection is the machine's, not the file's: a rerun with a higher cap examines it again
    again = prepare(manifest, tmp_path / "out", PrepareConfig(crop_size=[16, 16, 16], max_case_memory_gb=3.0),
                    progress=False, max_rejected=1.0)
    assert again["skipped"] == 3 and again["rejected"] == 1
    assert "(3.0 GiB)" in _quarantine(tmp_path / "out")[0]["reason"]


@pytest.mark.slow
def test_case_larger_than_every_node_is_rejected_not_retried(ray_session, tmp_path, monkeypatch):
    from raymim.data.memory import largest_node_memory
    from raymim.data.pipeline import prepare

    monkeypatch.setenv("RAYMIM_DEID_KEY", "k")
    # 256^3 voxels at 4 mm resampled to 0.25 mm: 4096x the voxels, terabytes on any machine
    scan = sparse_nifti(tmp_path / "scan.nii", (256, 256, 256), (4.0, 4.0, 4.0))
    cfg = PrepareConfig(crop_size=[16, 16, 16], spacing=[0.25, 0.25, 0.25])
    assert estimate_bytes({"image": str(scan)}, cfg) > largest_node_memory() > 0
    summary = prepare(scan, tmp_path / "out", cfg, progress=False, max_rejected=1.0)
    assert summary["rejected"] == 1 and summary["ok"] == 0 and summary["exit_code"] == 3, summary
    (row,) = _quarantine(tmp_path / "out")
    assert "the largest Ray node's memory" in row["reason"], row
