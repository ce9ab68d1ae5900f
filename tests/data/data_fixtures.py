"""Helpers for data-plane tests: a corpus of broken inputs, one per rejection rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.header.set_zooms(tuple(zooms) + (1.0,) * (data.ndim - 3))
    nib.save(img, path)
    return path


# name -> expected substring of the quarantine reason
BROKEN = {
    "zero.nii.gz": "zero-byte",
    "truncated.nii.gz": "corrupt",
    "truncated_raw.nii": "truncated",
    "magic.nii": "wrong magic",
    "magic.nrrd": "wrong magic",
    "flat2d.nii.gz": "not a 3D volume",
    "four_d.nii.gz": "4D",
    "nan.nii.gz": "NaN",
    "constant.nii.gz": "constant image",
    "huge_dims.nii": "absurd header dimensions",
    "bad_spacing.nii.gz": "absurd voxel spacing",
    "dicom_bad_slice": "unreadable DICOM slice",
    "dicom_mixed": "mixed series",
    "missing.nii.gz": "not found",
    "escape": "escapes",
}


def make_broken_corpus(root: Path, shared: Path | None) -> Path:
    """Write one broken input per rejection rule plus a manifest listing them; return the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = rng.normal(0, 100, (16, 16, 16)).astype(np.float32)
    (root / "zero.nii.gz").write_bytes(b"")
    full = _nifti(root / "full.nii.gz", good).read_bytes()
    (root / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    (root / "full.nii.gz").unlink()
    raw = _nifti(root / "raw.nii", good).read_bytes()
    (root / "truncated_raw.nii").write_bytes(raw[: len(raw) // 2])
    (root / "raw.nii").unlink()
    (root / "magic.nii").write_bytes(bytes(rng.integers(0, 255, 2000, dtype=np.uint8)))
    (root / "magic.nrrd").write_bytes(b"not a nrrd header\n" * 20)
    _nifti(root / "flat2d.nii.gz", rng.normal(size=(32, 32, 1)).astype(np.float32))
    _nifti(root / "four_d.nii.gz", rng.normal(size=(8, 8, 8, 3)).astype(np.float32))
    nan = good.copy()
    nan[3, 3, 3] = np.nan
    _nifti(root / "nan.nii.gz", nan)
    _nifti(root / "constant.nii.gz", np.full((16, 16, 16), 7.0, np.float32))
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((4000, 4000, 4000))
    with open(root / "huge_dims.nii", "wb") as f:
        f.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1024)
    _nifti(root / "bad_spacing.nii.gz", good, zooms=(1.0, 1.0, 5000.0))
    rows = [name for name in BROKEN if name not in ("dicom_bad_slice", "dicom_mixed", "missing.nii.gz", "escape")]
    if shared is not None:
        series = sorted((shared / "totalsegmentator" / "example_ct_dicom").iterdir())[:4]
        for name in ("dicom_bad_slice", "dicom_mixed"):
            (root / name).mkdir(exist_ok=True)
            for f in series:
                shutil.copy(f, root / name / f.name)
            rows.append(name)
        victim = sorted((root / "dicom_bad_slice").iterdir())[1]
        victim.write_bytes(victim.read_bytes()[:100])
        import pydicom

        other = sorted((root / "dicom_mixed").iterdir())[2]
        ds = pydicom.dcmread(other)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.9"
        ds.save_as(other)
    lines = ["image"] + rows + ["missing.nii.gz", "../outside.nii.gz"]
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
