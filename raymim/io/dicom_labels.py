"""Labels exported as DICOM: RT structure sets (RTSTRUCT) and DICOM-SEG, placed on an image's grid.

Both come out as a ``uint8`` label map in the voxel order :class:`~raymim.io.readers.VolumeReader`
gives the image (``[column, row, slice]`` for a DICOM series, the file's order otherwise), with the
image's RAS affine, plus the class names: ``{ROI or segment name: label value}``.

- **DICOM-SEG** is decoded by highdicom (``highdicom.seg.segread``). When the image is the DICOM
  series the SEG was derived from, frames are matched to slices by their source SOP Instance UIDs
  (exact, no resampling); otherwise the SEG volume is placed on the image grid by nearest
  neighbour through both affines.
- **RTSTRUCT** contours (``CLOSED_PLANAR`` polygons in patient coordinates, mm) are mapped to
  voxel coordinates with the image affine and filled slice by slice with
  ``matplotlib.path.Path.contains_points`` (a voxel belongs to a contour when its centre is inside;
  contours of one ROI on one slice combine even-odd, so an inner contour is a hole, as RT systems
  draw them). We rasterise here rather than through rt-utils: rt-utils 1.2.7 pulls in the GUI
  build of OpenCV (``opencv-python``, needing ``libGL`` on servers) and the ``dataclasses``
  backport, and reads the whole folder as one series; the filling it delegates to
  ``cv2.fillPoly`` is what ``contains_points`` does here with a library we already pin.

``names`` selects and numbers the classes: a sequence of names (values 1..K in that order) or a
mapping ``{name: value}``; names match case- and space-insensitively; other ROIs / segments are
left out. Without ``names`` every ROI / segment is kept, numbered 1..K in file order. Where
classes overlap, the later one (higher value) wins.

Example::

    label, meta, names = read_dicom_label("rtstruct.dcm", "ct_series/", names=["Liver", "Spleen"])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raymim.io.checks import CaseRejected, open_regular
from raymim.io.dicom import SOP_RTSTRUCT, SOP_SEG, series_files, series_geometry, sniff_dicom, sop_class

Names = Mapping[str, int] | Sequence[str] | None
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


def dicom_label_kind(path: str | os.PathLike) -> str | None:
    """``"rtstruct"``, ``"seg"`` or None, by content (SOP Class UID), for a regular file."""
    p = Path(path)
    if isinstance(path, list | tuple) or p.is_dir() or not sniff_dicom(p):
        return None
    import pydicom

    try:
        with open_regular(p) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # noqa: BLE001 - unreadable: not a label we can use
        return None
    sop = sop_class(ds)
    modality = str(ds.get("Modality") or "").upper()
    if sop == SOP_RTSTRUCT or modality == "RTSTRUCT":
        return "rtstruct"
    if sop == SOP_SEG or modality == "SEG":
        return "seg"
    return None


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def _values(found: Sequence[str], names: Names) -> dict[int, int]:
    """{position in ``found``: label value} under the ``names`` selection."""
    if names is None:
        return {i: i + 1 for i in range(len(found))}
    wanted = {_norm(k): int(v) for k, v in names.items()} if isinstance(names, Mapping) else \
        {_norm(n): i + 1 for i, n in enumerate(names)}
    if any(not 0 < v < 256 for v in wanted.values()):
        raise ValueError(f"label values should be in 1..255, got {sorted(wanted.values())}.")
    out = {i: wanted[_norm(n)] for i, n in enumerate(found) if _norm(n) in wanted}
    missing = sorted(set(wanted) - {_norm(n) for n in found})
    if missing:
        raise CaseRejected(f"{len(missing)} of the requested label names are not in the DICOM label")
    return out


def _grid(image: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The image grid: ``shape``, ``affine_lps`` (voxel -> LPS mm) and, for DICOM series, the
    slices' SOP Instance UIDs in array order."""
    p = None if isinstance(image, list | tuple) else Path(image)
    if p is None or p.is_dir() or sniff_dicom(p):
        return series_geometry(image if p is None else p)
    from raymim.io.readers import VolumeReader

    reader = VolumeReader(validate=False)
    data, meta = reader.get_data(reader.read(str(p)))
    return {"shape": tuple(data.shape), "affine_lps": _LPS @ np.asarray(meta["affine"], dtype=np.float64),
            "sop_instance_uids": None, "frame_of_reference": None}


def _rasterise_rtstruct(ds: Any, grid: dict[str, Any], names: Names) -> tuple[np.ndarray, dict[str, int]]:
    from matplotlib.path import Path as Polygon

    rois = {int(r.ROINumber): str(r.get("ROIName") or f"ROI {int(r.ROINumber)}")
            for r in ds.get("StructureSetROISequence", [])}
    numbers = list(rois)
    values = _values([rois[n] for n in numbers], names)
    by_number = {numbers[i]: v for i, v in values.items()}
    shape = tuple(int(s) for s in grid["shape"])
    label = np.zeros(shape, dtype=np.uint8)
    inv = np.linalg.inv(grid["affine_lps"])
    placed = 0
    for roi in sorted(ds.get("ROIContourSequence", []), key=lambda r: by_number.get(int(r.ReferencedROINumber), 0)):
        value = by_number.get(int(roi.ReferencedROINumber))
        if value is None:
            continue
        mask = np.zeros(shape, dtype=bool)
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue  # points and open polylines enclose no voxels
            pts = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
            if len(pts) < 3:
                continue
            ijk = (inv @ np.c_[pts, np.ones(len(pts))].T)[:3].T
            k = float(np.median(ijk[:, 2]))
            if np.ptp(ijk[:, 2]) > 0.5 or abs(k - round(k)) > 0.25 or not 0 <= round(k) < shape[2]:
                raise CaseRejected("an RTSTRUCT contour does not lie on a slice of the image grid")
            poly = Polygon(ijk[:, :2])
            lo = np.maximum(np.floor(ijk[:, :2].min(0)).astype(int), 0)
            hi = np.minimum(np.ceil(ijk[:, :2].max(0)).astype(int) + 1, shape[:2])
            if (hi <= lo).any():
                continue
            ii, jj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
            inside = poly.contains_points(np.c_[ii.ravel(), jj.ravel()]).reshape(ii.shape)
            mask[lo[0]:hi[0], lo[1]:hi[1], round(k)] ^= inside  # even-odd: inner contours are holes
            placed += 1
        label[mask] = value
    if ds.get("ROIContourSequence") and placed == 0 and by_number:
        raise CaseRejected("the RTSTRUCT has no closed contour on the image grid")
    return label, {rois[numbers[i]]: v for i, v in values.items()}


def _read_seg(path: Path, grid: dict[str, Any], names: Names) -> tuple[np.ndarray, dict[str, int]]:
    import highdicom as hd

    try:
        with open_regular(path) as f:
            seg = hd.seg.segread(f)
    except CaseRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - highdicom raises many types for broken SEGs
        raise CaseRejected(f"unreadable DICOM-SEG ({type(exc).__name__})") from None
    segments = [(int(s.SegmentNumber), str(s.get("SegmentLabel") or f"segment {int(s.SegmentNumber)}"))
                for s in seg.SegmentSequence]
    values = _values([name for _, name in segments], names)
    lut = np.zeros(max(n for n, _ in segments) + 1, dtype=np.uint8)
    for i, v in values.items():
        lut[segments[i][0]] = v
    wanted = sorted(segments[i][0] for i in values)
    shape = tuple(int(s) for s in grid["shape"])
    uids = grid.get("sop_instance_uids")
    refs = set(seg.get_source_image_uids()) if uids else set()
    if uids and len(set(uids)) == len(uids) and all(uids) and any(u[2] in set(uids) for u in refs):
        px = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=wanted, combine_segments=True, relabel=False,
            assert_missing_frames_are_empty=True, skip_overlap_checks=True, dtype=np.uint16)
        seg_numbers = np.asarray(px).transpose(2, 1, 0)  # (slice, row, col) -> (col, row, slice)
    else:  # another grid: nearest neighbour through both affines
        vol = seg.get_volume(segment_numbers=wanted, combine_segments=True, relabel=False,
                             skip_overlap_checks=True, dtype=np.uint16)
        src = np.asarray(vol.array)
        to_src = np.linalg.inv(np.asarray(vol.affine, dtype=np.float64)) @ grid["affine_lps"]
        seg_numbers = np.zeros(shape, dtype=np.uint16)
        ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        for k in range(shape[2]):  # one slice at a time keeps the index arrays small
            pts = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])
            idx = np.rint((to_src @ pts)[:3]).astype(np.int64)
            ok = ((idx >= 0) & (idx < np.asarray(src.shape[:3])[:, None])).all(0)
            flat = np.zeros(ii.size, dtype=np.uint16)
            flat[ok] = src[idx[0, ok], idx[1, ok], idx[2, ok]]
            seg_numbers[:, :, k] = flat.reshape(ii.shape)
    if seg_numbers.shape != shape:
        raise CaseRejected("the DICOM-SEG does not cover the image grid")
    label = lut[np.clip(seg_numbers, 0, len(lut) - 1)]
    return label.astype(np.uint8), {segments[i][1]: v for i, v in values.items()}


def read_dicom_label(label: str | os.PathLike, image: str | os.PathLike | Sequence[str | os.PathLike],
                     names: Names = None) -> tuple[np.ndarray, dict[str, Any], dict[str, int]]:
    """``(label uint8 [X, Y, Z], meta with the image's RAS "affine", {class name: value})`` of an
    RTSTRUCT or DICOM-SEG file placed on ``image`` (a DICOM series folder / slice list, or a
    NIfTI / NRRD file). Raises :class:`CaseRejected` when it is neither or does not fit the grid."""
    kind = dicom_label_kind(label)
    if kind is None:
        raise CaseRejected("the label is neither an RTSTRUCT nor a DICOM-SEG file")
    grid = _grid(image)
    if kind == "rtstruct":
        import pydicom

        with open_regular(label) as f:
            ds = pydicom.dcmread(f)
        frame = grid.get("frame_of_reference")
        refs = {str(r.get("FrameOfReferenceUID") or "") for r in ds.get("ReferencedFrameOfReferenceSequence", [])}
        if frame and refs - {""} and frame not in refs:
            raise CaseRejected("the RTSTRUCT was drawn on another frame of reference than the image")
        out, classes = _rasterise_rtstruct(ds, grid, names)
    else:
        out, classes = _read_seg(Path(label), grid, names)
    affine = _LPS @ grid["affine_lps"]
    return out, {"affine": affine, "original_affine": affine.copy(), "space": "RAS"}, classes


def dicom_label_to_nifti(label: str | os.PathLike, image: str | os.PathLike | Sequence[str | os.PathLike],
                         out_path: str | os.PathLike, names: Names = None) -> dict[str, int]:
    """Write :func:`read_dicom_label`'s map as a NIfTI file on the image grid (what the data plane's
    ``LoadImage`` reads next to the image); returns ``{class name: value}``."""
    import nibabel as nib

    data, meta, classes = read_dicom_label(label, image, names)
    nib.save(nib.Nifti1Image(data, meta["affine"]), str(out_path))
    return classes


__all__ = ["dicom_label_kind", "dicom_label_to_nifti", "read_dicom_label", "series_files"]
