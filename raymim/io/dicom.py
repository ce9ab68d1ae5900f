"""DICOM series reading with pydicom (+ pylibjpeg for JPEG / JPEG2000 transfer syntaxes).

A series is a folder of single-frame slices. Slices are sorted by their position along the
slice normal (``ImagePositionPatient`` projected on ``row x col`` cosines), not by
``InstanceNumber`` which scanners do not always fill consistently; rescale slope / intercept are
applied per slice. Output: a float32 array indexed ``[column, row, slice]`` (MONAI's
``swap_ij`` convention) with a RAS affine. Rejection reasons never quote header values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raymim.io.readers import CaseRejected, check_geometry


def _series_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.name.upper() != "DICOMDIR"]
    if not files:
        raise CaseRejected("empty DICOM folder")
    return files


def _read_headers(files: list[Path]) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for i, f in enumerate(files):
        if f.stat().st_size == 0:
            raise CaseRejected(f"unreadable DICOM slice #{i} (zero-byte file)")
        try:
            ds = pydicom.dcmread(str(f))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise CaseRejected(f"unreadable DICOM slice #{i} ({type(exc).__name__})") from None
        out.append(ds)
    return out


def _geometry(slices: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row cosine, column cosine, pixel spacing [between rows, between columns])."""
    try:
        iop = np.asarray([float(v) for v in slices[0].ImageOrientationPatient], dtype=np.float64)
        ps = np.asarray([float(v) for v in slices[0].PixelSpacing], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        raise CaseRejected("DICOM series lacks ImageOrientationPatient / PixelSpacing") from None
    for ds in slices[1:]:
        other = np.asarray([float(v) for v in getattr(ds, "ImageOrientationPatient", [])] or [np.nan] * 6)
        if other.shape != (6,) or not np.allclose(other, iop, atol=1e-3):
            raise CaseRejected("mixed series: slices with different orientations")
    return iop[:3], iop[3:], ps


def read_dicom_series(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a DICOM series folder -> (float32 array [X, Y, Z], meta with a RAS ``affine``)."""
    files = _series_files(Path(path))
    slices = _read_headers(files)
    uids = {getattr(ds, "SeriesInstanceUID", None) for ds in slices}
    if len(uids) > 1:
        raise CaseRejected(f"mixed series: {len(uids)} SeriesInstanceUIDs in one folder")
    if any(not hasattr(ds, "PixelData") for ds in slices):
        raise CaseRejected("DICOM slice without pixel data")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    if len(shapes) > 1:
        raise CaseRejected("mixed series: slices of different sizes")
    row_cos, col_cos, ps = _geometry(slices)
    normal = np.cross(row_cos, col_cos)
    try:
        pos = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    except (AttributeError, TypeError, ValueError):
        raise CaseRejected("DICOM slice without ImagePositionPatient") from None
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    if len(slices) > 1 and np.min(np.diff(dist[order])) < 1e-4:
        raise CaseRejected("mixed series: duplicate slice positions")
    rows, cols = shapes.pop()
    step = (pos[order[-1]] - pos[order[0]]) / (len(order) - 1) if len(order) > 1 else normal
    check_geometry((cols, rows, len(order)), (ps[1], ps[0], float(np.linalg.norm(step))))
    volume = np.empty((cols, rows, len(order)), dtype=np.float32)
    for k, idx in enumerate(order):
        ds = slices[idx]
        try:
            arr = ds.pixel_array
        except Exception as exc:  # decoder plugins raise many types
            raise CaseRejected(f"undecodable pixel data in DICOM slice #{int(idx)} ({type(exc).__name__})") from None
        if arr.ndim != 2:
            raise CaseRejected(f"multi-frame or colour DICOM slice (shape {arr.shape})")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        volume[:, :, k] = arr.T.astype(np.float32) * slope + intercept
    lps = np.eye(4)
    lps[:3, 0] = row_cos * ps[1]  # +i (next column) moves along the row cosine
    lps[:3, 1] = col_cos * ps[0]  # +j (next row) moves along the column cosine
    lps[:3, 2] = step
    lps[:3, 3] = pos[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS (MONAI / NIfTI)
    meta = {"affine": affine, "original_affine": affine.copy(), "space": "RAS"}
    return volume, meta
